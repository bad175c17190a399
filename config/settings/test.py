"""The test suite: PostgreSQL and Redis, never SQLite; fast hashing; media in a throwaway directory."""

import os
import tempfile
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from .base import *
from .base import (
    BROKER_SOURCE,
    CELERY_BROKER_URL,
    DATABASE_IS_POSTGRES,
    DATABASE_SOURCE,
)

if not DATABASE_IS_POSTGRES:
    raise ImproperlyConfigured(
        f"the test suite runs on PostgreSQL, but the database chosen was {DATABASE_SOURCE}. Start PostgreSQL "
        "(see ../shared/SERVICES.md) or set DATABASE_URL=postgres://USER@HOST:PORT/NAME"
    )
if not CELERY_BROKER_URL.startswith("redis://"):
    raise ImproperlyConfigured(
        f"the test suite needs Redis, but the broker chosen was {BROKER_SOURCE}. Start Redis "
        "(see ../shared/SERVICES.md) or set CELERY_BROKER_URL=redis://HOST:PORT/DB"
    )

DEBUG = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
MEDIA_ROOT = Path(os.environ.get("FOIL_TEST_MEDIA_ROOT") or tempfile.mkdtemp(prefix="foil-test-media-"))
FOIL_DATA_ROOT = MEDIA_ROOT / "data"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise serves from it (empty until collectstatic)
