"""The eval presets' decode (deepindex.data.transforms) on images a user could send: no torch, no Ray."""
from __future__ import annotations

import pytest
from PIL import Image


@pytest.mark.timeout(30)
@pytest.mark.parametrize("preset", ["fit", "photo"])
def test_a_sliver_of_an_image_decodes_in_little_memory(preset):
    """Found on review: a 1 x 100000 PNG (274 bytes, within every limit) asked the preset's resize for a
    224 x 22.4M image (~20 GB, a dead replica), and a 1 x 16M one overflowed.  Only the centre reaches
    the crop: the sliver is cut around it first, and comes out as the model's input."""
    import io
    import resource

    from deepindex.data.transforms import MAX_ASPECT, decode_file, preset_resize

    for w, h in ((1, 100_000), (100_000, 1), (3, 16_000_000 // 3)):
        buf = io.BytesIO()
        Image.new("L", (w, h), 128).save(buf, format="PNG")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        buf.seek(0)
        out = decode_file(buf, 64, 3, preset)
        grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert out.shape == (3, 64, 64) and (out == 128).all() and grew_mb < 500, grew_mb
    # At MAX_ASPECT:1 or below nothing is cut: the output is torchvision's own (the tests above).
    edge = Image.new("L", (MAX_ASPECT * 3, 3), 7)
    assert preset_resize(edge, 16, preset).size == (16, 16)
