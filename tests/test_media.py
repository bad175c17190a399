"""Stored files under /media/: served to researchers with DEBUG off too (the admin's file links), never to
anyone else, and never from outside MEDIA_ROOT."""

from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

pytestmark = pytest.mark.django_db


@pytest.fixture
def stored():
    path = Path(settings.MEDIA_ROOT) / "explanations" / "0123abcd.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG stored bytes")
    yield "explanations/0123abcd.png"
    path.unlink()


@override_settings(DEBUG=False)
def test_a_researcher_gets_a_stored_file_with_debug_off(stored):
    staff = get_user_model().objects.create_user(username="ada", password="a-long-password-1", is_staff=True)
    client = Client()
    client.force_login(staff)
    response = client.get(f"/media/{stored}")
    assert response.status_code == 200 and b"".join(response.streaming_content) == b"\x89PNG stored bytes"
    assert response["Cache-Control"] == "private, no-store"
    assert client.get("/media/explanations/absent.png").status_code == 404
    outside = Path(settings.MEDIA_ROOT).parent / "outside-media.txt"
    outside.write_text("secret")
    try:
        assert client.get("/media/../outside-media.txt").status_code == 404
        assert client.get("/media/explanations/%2e%2e/%2e%2e/outside-media.txt").status_code == 404
    finally:
        outside.unlink()


def test_raters_and_strangers_get_no_stored_file(stored):
    anonymous = Client().get(f"/media/{stored}")
    assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]
    user = get_user_model().objects.create_user(username="rater", password="a-long-password-2")
    client = Client()
    client.force_login(user)
    response = client.get(f"/media/{stored}")
    assert response.status_code == 302 and b"PNG" not in response.content
