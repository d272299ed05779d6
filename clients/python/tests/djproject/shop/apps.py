from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "djproject.shop"
    label = "shop"
