"""Chat bots (the `imbot` API): a message to a bot, edited or deleted, a bot added to a chat, a
slash command, a bot deleted. `data[BOT]` (`data[COMMAND]` for a command) is keyed by the
bot's (the command's) id; the OAuth pair Bitrix24 puts there is never in the queue's copy."""

from __future__ import annotations

from typing import ClassVar

from b24queue.events.typed.base import Fields, TypedEvent


class BotFields(Fields):
    """One entry of `data[BOT]`: which of the app's bots the event is for."""

    bot_id: str
    bot_code: str | None = None


class CommandFields(BotFields):
    """One entry of `data[COMMAND]`: the command, its bot and what was typed after it."""

    command: str
    command_id: str | None = None
    command_params: str | None = None  # the text after the command
    command_context: str | None = None  # "TEXTAREA", "KEYBOARD", "MENU"
    message_id: str | None = None


class MessageParams(Fields):
    """`data[PARAMS]`: the message and the chat; answer with `imbot.message.add` to
    `dialog_id`."""

    dialog_id: str
    message: str | None = None
    message_id: str | None = None
    id: str | None = None  # the message's id, in ONIMBOTMESSAGEDELETE
    message_type: str | None = None  # "P" one-to-one, "C" / "O" chats
    from_user_id: str | None = None
    to_user_id: str | None = None
    to_chat_id: str | None = None
    chat_id: str | None = None
    chat_type: str | None = None
    author_id: str | None = None
    language: str | None = None


class ChatUser(Fields):
    """`data[USER]`: who wrote (or added the bot)."""

    id: str
    name: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    work_position: str | None = None
    gender: str | None = None
    is_bot: str | None = None
    is_connector: str | None = None
    is_network: str | None = None
    is_extranet: str | None = None


class BotMessageData(Fields):
    bot: dict[str, BotFields]
    params: MessageParams
    user: ChatUser | None = None


class BotChatEvent(TypedEvent):
    """A message to one of the app's bots (added, updated, deleted) or the bot added to a chat."""

    EVENTS: ClassVar[tuple[str, ...]] = (
        "ONIMBOTMESSAGEADD",
        "ONIMBOTMESSAGEUPDATE",
        "ONIMBOTMESSAGEDELETE",
        "ONIMBOTJOINCHAT",
    )
    data: BotMessageData

    @property
    def bot(self) -> BotFields:
        """The bot the event is for (the first entry of `data[BOT]`)."""
        return next(iter(self.data.bot.values()))

    @property
    def params(self) -> MessageParams:
        return self.data.params

    @property
    def dialog_id(self) -> str:
        """Where to answer (`DIALOG_ID` of `imbot.message.add`)."""
        return self.data.params.dialog_id


class BotMessageAdded(BotChatEvent):
    EVENTS = ("ONIMBOTMESSAGEADD",)


class BotMessageUpdated(BotChatEvent):
    EVENTS = ("ONIMBOTMESSAGEUPDATE",)


class BotMessageDeleted(BotChatEvent):
    EVENTS = ("ONIMBOTMESSAGEDELETE",)


class BotJoinedChat(BotChatEvent):
    EVENTS = ("ONIMBOTJOINCHAT",)


class CommandData(Fields):
    command: dict[str, CommandFields]
    params: MessageParams
    user: ChatUser | None = None


class CommandAdded(TypedEvent):
    """ONIMCOMMANDADD: a slash command of one of the app's bots was typed."""

    EVENTS = ("ONIMCOMMANDADD",)
    data: CommandData

    @property
    def command(self) -> CommandFields:
        """The command (the first entry of `data[COMMAND]`)."""
        return next(iter(self.data.command.values()))

    @property
    def params(self) -> MessageParams:
        return self.data.params

    @property
    def dialog_id(self) -> str:
        return self.data.params.dialog_id


class BotDeletedFields(Fields):
    bot_id: str
    bot_code: str | None = None


class BotDeleted(TypedEvent):
    """ONIMBOTDELETE: one of the app's bots was deleted."""

    EVENTS = ("ONIMBOTDELETE",)
    data: BotDeletedFields
