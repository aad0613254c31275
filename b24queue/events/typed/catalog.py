"""Catalog: products and their prices, price types, units of measure and rounding rules
(`CATALOG.PRODUCT.ON.ADD`...: dotted names, each dot a routing-key word). Bitrix24 sends the id
(`data[FIELDS][ID]`; a product also its `TYPE`)."""

from __future__ import annotations

from b24queue.events.typed.base import Fields, TypedEvent

_ACTIONS = ("ADD", "UPDATE", "DELETE")


class CatalogFields(Fields):
    id: str


class CatalogData(Fields):
    fields: CatalogFields


class CatalogEvent(TypedEvent):
    data: CatalogData

    @property
    def fields(self) -> CatalogFields:
        return self.data.fields

    @property
    def id(self) -> str:
        return self.data.fields.id


def _names(entity: str, *actions: str) -> tuple[str, ...]:
    return tuple(f"CATALOG.{entity}.ON.{action}" for action in actions)


class ProductFields(CatalogFields):
    type: str | None = None  # 1 simple product, 3 SKU parent, 4 variation, 7 service...


class ProductData(CatalogData):
    fields: ProductFields


class ProductEvent(CatalogEvent):
    EVENTS = _names("PRODUCT", *_ACTIONS)
    data: ProductData

    @property
    def fields(self) -> ProductFields:
        return self.data.fields


class ProductAdded(ProductEvent):
    EVENTS = _names("PRODUCT", "ADD")


class ProductUpdated(ProductEvent):
    EVENTS = _names("PRODUCT", "UPDATE")


class ProductDeleted(ProductEvent):
    EVENTS = _names("PRODUCT", "DELETE")


class PriceEvent(CatalogEvent):
    EVENTS = _names("PRICE", *_ACTIONS)


class PriceAdded(PriceEvent):
    EVENTS = _names("PRICE", "ADD")


class PriceUpdated(PriceEvent):
    EVENTS = _names("PRICE", "UPDATE")


class PriceDeleted(PriceEvent):
    EVENTS = _names("PRICE", "DELETE")


class PriceTypeEvent(CatalogEvent):
    EVENTS = _names("PRICE.TYPE", *_ACTIONS)


class MeasureEvent(CatalogEvent):
    EVENTS = _names("MEASURE", *_ACTIONS)


class RoundingRuleEvent(CatalogEvent):
    EVENTS = _names("ROUNDING", *_ACTIONS)
