"""The wiring: ``serving.app:build_app(args)`` -> Ingress(model, index, metrics hub); the model replicas
follow the index replica's choice of version (it moves model and index together).  With
``model_in_ingress`` there are no model replicas: each ingress replica holds the model.

``serve run serving/config.yaml``, ``serve deploy``, the RayService and ``deepindex serve``
all build the application here; ``args`` are :class:`serving.schemas.ServeArgs`.
"""
from __future__ import annotations

from typing import Any, cast

from ray.serve import Application, Deployment

from serving.schemas import ServeArgs


def _scaling(replicas: int, autoscaling: dict[str, Any] | None) -> dict[str, Any]:
    # Serve takes a fixed replica count or an autoscaling config, never both.
    return {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}


def _actor_options(num_cpus: float) -> dict[str, Any]:
    return {"num_cpus": num_cpus}


def _deployment(cls: object) -> Deployment:
    """``cls`` as what ``@serve.deployment`` made of it: mypy does not apply class decorators."""
    return cast(Deployment, cls)


def build_app(args: dict[str, Any] | None = None) -> Application:
    from deepindex.config import validate_as
    from deepindex.index.build import check_features
    from deepindex.tracking.registry import require_model
    from serving.index import IndexServer
    from serving.ingress import Ingress
    from serving.metrics import MetricsHub
    from serving.model import ModelServer

    a = validate_as(ServeArgs, args or {}, prefix="args.").resolved()  # one line naming the arg at fault
    a.api_token_digest()  # a missing token file is an error now, not in a replica later
    require_model(a.model, a.tracking_uri)  # so is a model that is not there (a replica would fail to start)
    # And descriptors the model lacks, as `index build` refuses them: the index replica's build would fail
    # and be retried forever, every search a 503, in place of the service this one replaces.
    check_features(a.features, a.model, a.tracking_uri)
    # One index replica: the collection's writer and the owner of the served (model, index) pair.
    index = _deployment(IndexServer).options(ray_actor_options=_actor_options(0)).bind(a.model_dump())
    # One hub: /metrics answers for every ingress replica, whichever one the scrape reaches.
    hub = _deployment(MetricsHub).options(ray_actor_options=_actor_options(0)).bind()
    model: Any = None
    if not a.model_in_ingress:  # else every ingress replica loads the model (serving/ingress.py)
        model = _deployment(ModelServer).options(
            **_scaling(a.model_replicas, a.model_autoscaling),
            # Enough requests in flight per replica for full batches to form.
            max_ongoing_requests=max(2 * a.max_batch_size, 8),
            ray_actor_options=_actor_options(a.model_num_cpus),
        ).bind(a.model, index, a.tracking_uri, a.max_batch_size, a.batch_wait_timeout_s, a.model_threads_or_cpus(),
              a.forward_batch_size)
    return _deployment(Ingress).options(**_scaling(a.ingress_replicas, a.ingress_autoscaling),
                           max_ongoing_requests=256,
                           ray_actor_options=_actor_options(a.ingress_cpus())).bind(model, index, a.model_dump(), hub)
