from b24queue import Event, Property, Robot, RobotConsumer, call_of

GREET = Robot(
    code="greet",
    name={"en": "Greet the client", "de": "Kunden begrüßen"},
    properties={"who": Property(name="Who", required=True)},
    return_properties={"greeting": Property(name="Greeting")},
)


class Greeter(RobotConsumer):
    queue = "robots.greet"  # bound to ROBOT.GREET: this robot's calls
    bizproc = GREET

    async def handle(self, event: Event) -> dict[str, str]:
        who = call_of(event).properties["who"]
        await self.log_to_workflow(event, f"greeting {who}")  # a line in the workflow's log
        return {"greeting": f"Hello, {who}"}  # sent back with bizproc.event.send
