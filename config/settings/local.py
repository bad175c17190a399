"""`make demo` and `make web`: the same settings as a server (DEBUG off, gunicorn, WhiteNoise) unless
DJANGO_DEBUG=1, which `make web` (the development server) sets."""

from .base import *
