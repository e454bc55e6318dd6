"""The Ray Serve application (import path ``serving.app:build_app``); thin: the work is in ``deepindex``."""
