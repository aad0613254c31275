"""b24queue: take every Bitrix24 event, answer at once, process it reliably later."""

from b24queue.bizproc import Activity, Property, Robot, RobotConsumer, call_of
from b24queue.consumer import EventConsumer
from b24queue.errors import B24QueueError
from b24queue.events.event import Auth, Event
from b24queue.portal.api import Portal, PortalError, PortalRetry
from b24queue.producer import Producer
from b24queue.publishing import PublishInputError
from b24queue.retry import Reject, Retry
from b24queue.settings import Settings, load_settings

__all__ = [
    "Activity",
    "Auth",
    "B24QueueError",
    "Event",
    "EventConsumer",
    "Portal",
    "PortalError",
    "PortalRetry",
    "Producer",
    "Property",
    "PublishInputError",
    "Reject",
    "Retry",
    "Robot",
    "RobotConsumer",
    "Settings",
    "call_of",
    "load_settings",
]
__version__ = "0.1.0"
