"""A researcher's own server (docker-compose): secrets from the environment, secure cookies."""

import os

from django.core.exceptions import ImproperlyConfigured

from .base import *
from .base import SECRET_KEY_FROM_ENVIRONMENT

if not SECRET_KEY_FROM_ENVIRONMENT:
    raise ImproperlyConfigured("DJANGO_SECRET_KEY is not set; set it to a long random string for production")

DEBUG = False
SESSION_COOKIE_SECURE = os.environ.get("DJANGO_SECURE_COOKIES", "1") == "1"
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"  # rater pages allow MTurk's worker sites instead (FOIL_RATER_FRAME_ANCESTORS)
