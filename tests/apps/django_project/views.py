"""Views of the Django test project; the broadcaster is configured by ``SSECAST_TEST_*``."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse, HttpResponseForbidden, JsonResponse
from django.http.response import HttpResponseBase
from django.views.decorators.http import require_POST

from apps.flask_django_support import TOKEN, broadcaster_from_env, lifetime, publish_batch
from ssecast.django import EventStreamView, stream

broadcaster = broadcaster_from_env()


def events(request: HttpRequest) -> HttpResponseBase:
    if request.headers.get("Authorization") != f"Bearer {TOKEN}":
        return HttpResponseForbidden()
    return stream(
        request,
        broadcaster,
        *request.GET.getlist("channel"),
        key=lambda request: request.GET.get("user"),
        lifetime=lambda request: lifetime(request.GET),
    )


prices = EventStreamView.as_view(
    broadcaster=broadcaster,
    channels=["prices"],
    key=lambda request: request.GET.get("user"),
    lifetime=lambda request: lifetime(request.GET),
)


@require_POST
def publish(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"ids": publish_batch(broadcaster, json.loads(request.body))})


def stats(request: HttpRequest) -> HttpResponse:
    return JsonResponse(broadcaster.stats()._asdict())


@require_POST
def close(request: HttpRequest) -> HttpResponse:
    broadcaster.close()
    return HttpResponse(status=204)
