"""URLs of the Django test project."""

from django.urls import path

from apps.django_project import views

urlpatterns = [
    path("events", views.events),
    path("prices", views.prices),
    path("publish", views.publish),
    path("stats", views.stats),
    path("close", views.close),
]
