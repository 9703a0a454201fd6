"""The HTTP API: ``service.api.app.create_app()`` builds the FastAPI app.

Routes live one resource per module under ``service.api.routes``; request and
response models in ``schemas``, their rendering from job rows in ``presenters``
(importable without FastAPI: the webhook sender renders job bodies with it).
"""
