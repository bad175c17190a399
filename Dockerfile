# The image docker-compose.yml runs as web, worker and the one-shot migrate service.
# Runtime dependencies only (requirements.txt; the test tools are in requirements-dev.txt), a non-root user,
# static files collected at build time and served by WhiteNoise. .dockerignore keeps .venv, var/ and test
# artifacts out of the build context.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=config.settings.production
# pg_dump/pg_restore (client 15, as the db service) for `manage.py backup` and `manage.py restore`.
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin foil \
    && mkdir -p /media /data /backups && chown foil:foil /media /data /backups
WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY . .
# collectstatic needs settings but no secret and no database: a throwaway key for this one command.
RUN DJANGO_SECRET_KEY=collectstatic-only-not-a-secret DATABASE_URL=sqlite:////tmp/build.sqlite3 \
    CELERY_BROKER_URL=redis://unused:6379/0 python manage.py collectstatic --noinput \
    && rm -f /tmp/build.sqlite3
USER foil
EXPOSE 8000
CMD ["gunicorn", "config.wsgi:application", "--config", "config/gunicorn.conf.py", "--bind", "0.0.0.0:8000"]
