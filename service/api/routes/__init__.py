"""One module per resource; each exposes ``router(service) -> APIRouter``."""
