"""Tests for voicebridge.py, over real loopback sockets against fake OpenAI and fake OpenClaw servers.

The fakes follow docs/protocol.md and OpenAI's API reference: the OpenAI fake refuses a sideband for a call that is not
accepted (404 call_id_not_found), refuses ?model= and OpenAI-Beta, sends the full function-call event
sequence, and answers a response.create sent while a response is active with the
conversation_already_has_active_response error. The OpenClaw fake checks the token, the model name and
the messages like the real gateway, and notices when a client gives up on a request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import gc
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import types
import typing
import collections.abc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import typing_extensions
from aiohttp import web
from openai.types.realtime.call_accept_params import CallAcceptParams  # a reference only: voicebridge never uses it
from openai.types.realtime.realtime_response_create_params_param import RealtimeResponseCreateParamsParam

import voicebridge
from voicebridge import Config, ConfigError, make_app, verify_signature

def config_from(env: dict[str, str]) -> Config:
    """The Config of these settings, or ConfigError naming every problem (as main() reports them)."""
    config, problems = Config.parse(env)
    if problems:
        raise ConfigError(*problems)
    return config


SECRET = "whsec_" + base64.b64encode(b"voicebridge-test-signing-key-32b").decode()
API_KEY = "sk-test-openai-key-never-logged"
CLAW_TOKEN = "claw-token-never-logged"
ALICE = "+15551234567"
BOB = "+15557654321"
HERE = Path(__file__).parent
# What a real response.done carries in response.usage (openai-python's RealtimeResponseUsage): what OpenAI bills.
USAGE = {"total_tokens": 380, "input_tokens": 300, "output_tokens": 80,
         "input_token_details": {"text_tokens": 120, "audio_tokens": 180, "image_tokens": 0, "cached_tokens": 64,
                                 "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 0, "image_tokens": 0}},
         "output_token_details": {"text_tokens": 20, "audio_tokens": 60}}


def type_problems(value: Any, hint: Any, path: str = "") -> list[str]:
    """Where `value` does not fit openai-python's own type `hint` (a TypedDict of its request params): unknown or
    misspelt fields, missing required ones, and values a Literal refuses."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing_extensions.Required, typing_extensions.NotRequired):
        return type_problems(value, args[0], path)
    if typing_extensions.is_typeddict(hint):
        if not isinstance(value, dict):
            return [f"{path}: not an object"]
        hints = typing.get_type_hints(hint)
        found = [f"{path}.{key}: unknown parameter" for key in value if key not in hints]
        found += [f"{path}.{key}: missing" for key in hint.__required_keys__ if key not in value]
        return found + [p for key, v in value.items() if key in hints for p in type_problems(v, hints[key], f"{path}.{key}")]
    if origin in (typing.Union, types.UnionType):
        tries = [type_problems(value, arm, path) for arm in args]
        return [] if [] in tries else min(tries, key=len)
    if origin is typing.Literal:
        return [] if value in args else [f"{path}: {value!r} is not one of {', '.join(map(repr, args))}"]
    if origin in (list, collections.abc.Iterable):
        if not isinstance(value, list):
            return [f"{path}: not a list"]
        return [p for index, v in enumerate(value) for p in type_problems(v, args[0], f"{path}[{index}]")]
    return []


def test_the_type_check_of_the_fake_finds_a_misspelt_field() -> None:
    body = voicebridge.accept_payload(dataclasses.replace(config_from({"OPENAI_API_KEY": API_KEY,
                                                                        "OPENAI_WEBHOOK_SECRET": SECRET}),
                                                          reasoning_effort="high", log_transcripts=True))
    assert type_problems(body, CallAcceptParams) == []
    assert type_problems({**body, "reasonning": {"effort": "high"}}, CallAcceptParams) == [".reasonning: unknown parameter"]
    assert type_problems({"reasoning": {"effort": "lowest"}}, RealtimeResponseCreateParamsParam) == [
        ".reasoning.effort: 'lowest' is not one of 'minimal', 'low', 'medium', 'high', 'xhigh'"]


def caller_number(sip_headers: Any) -> str | None:
    """The caller's E.164 number as the webhook reads it from the From SIP header, or None."""
    return voicebridge.normalise_number(voicebridge.from_user(sip_headers))


# What the fake serves (openai-python 3.63.0 CallAcceptParams): the current models, those with a shutdown date (as
# OpenAI's model object gives it), and which of them reason (and so take `reasoning`).
SHUTDOWN_DATES = dict.fromkeys(("gpt-realtime", "gpt-realtime-2025-08-28", "gpt-realtime-mini",
                                "gpt-realtime-mini-2025-12-15", "gpt-audio-mini", "gpt-audio-mini-2025-12-15"), "2027-01-20")
REALTIME_MODELS = {"gpt-realtime-2", "gpt-realtime-2.1", "gpt-realtime-2.1-mini", *SHUTDOWN_DATES}
REASONING_MODELS = {"gpt-realtime-2", "gpt-realtime-2.1"}
VOICES = {"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"}
TRANSCRIPTION_MODELS = {"whisper-1", "gpt-transcribe", "gpt-live-transcribe", "gpt-4o-mini-transcribe",
                        "gpt-4o-mini-transcribe-2025-12-15", "gpt-4o-transcribe", "gpt-4o-transcribe-diarize",
                        "gpt-realtime-whisper"}
GREETING_SPOKEN = "Hi, this is your assistant. How can I help?"


# --- Helpers ------------------------------------------------------------------------------------


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Wait until predicate() is truthy and return it; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {getattr(predicate, '__name__', predicate)}")
        await asyncio.sleep(0.005)


def sign(body: bytes, *, secret: str = SECRET, msg_id: str | None = None, timestamp: int | None = None) -> dict[str, str]:
    """Standard Webhooks headers for body, as OpenAI sends them."""
    msg_id = msg_id or f"wh_{os.urandom(8).hex()}"
    timestamp = int(time.time()) if timestamp is None else timestamp
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
        "content-type": "application/json",
    }


def incoming_event(call_id: str, from_value: str = f'"Alice" <sip:{ALICE}@sip.example.com>;tag=9fxced76sl') -> bytes:
    """A realtime.call.incoming webhook body."""
    return json.dumps(
        {
            "object": "event",
            "id": f"evt_{os.urandom(8).hex()}",
            "type": "realtime.call.incoming",
            "created_at": int(time.time()),
            "data": {
                "call_id": call_id,
                "sip_headers": [
                    {"name": "From", "value": from_value},
                    {"name": "To", "value": "sip:+18005550100@sip.api.openai.com"},
                    {"name": "Call-ID", "value": "03782086-4ce9-44bf-8b0d-4e303d2cc590"},
                ],
            },
        }
    ).encode()


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


# --- Fake OpenAI: REST call control + the sideband -------------------------------------------------


class FakeCall:
    """One SIP call as OpenAI holds it."""

    def __init__(self, call_id: str) -> None:
        self.id = call_id
        self.state = "ringing"  # ringing -> accepted | rejected -> ended
        self.accept_script: list[int] = []  # statuses to answer the next accepts with, before success
        self.sideband_404s = 0  # refuse this many handshakes after accept (the documented race)
        self.sideband_down = False  # a proxy in the way is restarting: handshakes get 503
        self.close_on_connect: int | None = None  # complete the upgrade, then close at once with this code
        self.handshake_hangs = False  # accept the TCP connection, never answer the upgrade
        self.refuse_reasoning = False  # refuse `reasoning` in a response.create, as for a model that takes none
        self.hangup_script: list[int] = []  # statuses to answer the next hangups with, before success
        self.answers_lost = 0  # accepts that take effect but whose answer is lost (a 502 from a proxy in the way)
        self.on_accept: Callable[[], Any] | None = None  # called as an accept arrives; what it returns is kept
        self.accept_delay = 0.0  # how long OpenAI takes to answer an accept
        self.accept_seen: Any = None
        self.accepted_at: float | None = None
        self.accept_body: dict[str, Any] | None = None
        self.reject_body: Any = None
        self.hangup_at: float | None = None
        self.sideband_attempts: list[tuple[float, str, dict[str, str]]] = []  # (time, query, headers)
        self.ws: web.WebSocketResponse | None = None
        self.transport: Any = None  # the asyncio.Transport under the sideband (BaseTransport has no abort())
        self.received: list[dict[str, Any]] = []  # client events, in order
        self.sent: list[dict[str, Any]] = []  # server events, in order
        self.errors: list[dict[str, Any]] = []  # error events the fake had to send
        self.response_active = False
        self.function_calls: set[str] = set()  # call_ids the conversation knows
        self.item_ids: set[str] = set()  # ids of the items in the conversation
        self.speak_seconds = 0.02  # how long a response asked for with response.create lasts
        self.audio_tail = 0.0  # and how long its audio still plays after its response.done
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    def next_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):04d}"

    async def send(self, event: dict[str, Any]) -> None:
        event = {"event_id": self.next_id("event"), **event}
        self.sent.append({**event, "_at": time.monotonic()})
        assert self.ws is not None
        await self.ws.send_json(event)

    def outputs(self) -> list[dict[str, Any]]:
        """function_call_output items the conversation holds (so a refused repeat is not counted), without their ids."""
        return [
            {k: v for k, v in e["item"].items() if k != "id"} for e in self.received
            if e.get("type") == "conversation.item.create" and e.get("item", {}).get("type") == "function_call_output"
            and not any(err["error"]["event_id"] == e.get("event_id") for err in self.errors)
        ]

    def response_creates(self) -> list[dict[str, Any]]:
        return [e for e in self.received if e.get("type") == "response.create"]

    async def wait_idle(self) -> None:
        await eventually(lambda: not self.response_active)

    async def model_response(
        self,
        function_calls: list[tuple[str, str]] = (),  # type: ignore[assignment]
        status: str = "completed",
        audio_seconds: float = 0.0,
    ) -> list[str]:
        """A response the model starts on its own (server VAD), optionally with function calls.

        Sends the full event sequence of a tool round (docs/protocol.md, step 5) and returns the function call_ids.
        """
        await self.wait_idle()
        self.response_active = True
        response_id = self.next_id("resp")
        await self.send({"type": "response.created", "response": {"id": response_id, "status": "in_progress", "output": []}})
        if audio_seconds:
            await self.send({"type": "output_audio_buffer.started", "response_id": response_id})
        items, call_ids = [], []
        for index, (name, arguments) in enumerate(function_calls):
            item_id, call_id = self.next_id("item"), self.next_id("call")
            item = {"id": item_id, "type": "function_call", "status": "in_progress", "name": name, "call_id": call_id, "arguments": ""}
            common = {"response_id": response_id, "item_id": item_id, "output_index": index}
            await self.send({"type": "response.output_item.added", "response_id": response_id, "output_index": index, "item": item})
            for start in range(0, len(arguments), 7):
                await self.send({"type": "response.function_call_arguments.delta", **common, "call_id": call_id, "delta": arguments[start:start + 7]})
            await self.send({"type": "response.function_call_arguments.done", **common, "call_id": call_id, "name": name, "arguments": arguments})
            item = {**item, "arguments": arguments, "status": "completed" if status == "completed" else "incomplete"}
            await self.send({"type": "response.output_item.done", "response_id": response_id, "output_index": index, "item": item})
            items.append(item)
            call_ids.append(call_id)
        if audio_seconds:
            await asyncio.sleep(audio_seconds / 2)
        self.response_active = False
        if status == "completed":
            self.function_calls.update(call_ids)
        await self.send({"type": "response.done",
                         "response": {"id": response_id, "status": status, "output": items, "usage": USAGE}})
        if audio_seconds:
            await asyncio.sleep(audio_seconds / 2)  # the caller still hears the rest of the audio
            await self.send({"type": "output_audio_buffer.stopped", "response_id": response_id})
        return call_ids

    async def on_client_event(self, event: dict[str, Any]) -> None:
        """What the Realtime server does with a client event."""
        kind = event.get("type")
        response = event.get("response") or {}
        problems = type_problems(response, RealtimeResponseCreateParamsParam, "response")
        if "reasoning" in response and (self.refuse_reasoning or (self.accept_body or {}).get("model") not in
                                        REASONING_MODELS):
            problems.append("response.reasoning: unknown parameter")  # what the server says is not recorded: a guess
        if kind == "response.create" and problems:
            param = problems[0].split(":")[0]
            await self.error(event, "unknown_parameter", f"Unknown parameter: '{param}'.", param)
        elif kind == "response.create":
            if self.response_active:
                await self.error(event, "conversation_already_has_active_response",
                                 "Conversation already has an active response in progress")
                return
            self.response_active = True  # synchronously, as the server does, before any other event
            task = asyncio.create_task(self.answer_response_create((event.get("response") or {}).get("metadata")))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "conversation.item.create":
            item = event.get("item") or {}
            content = item.get("content")
            if item.get("id") in self.item_ids:  # a client-chosen id makes a repeated create harmless
                await self.error(event, "invalid_value", f"Item with id {item['id']!r} already exists")
            elif item.get("type") == "function_call_output" and item.get("call_id") not in self.function_calls:
                await self.error(event, "invalid_value", "Tool call ID not found in conversation")
            elif item.get("type") == "function_call_output" and not isinstance(item.get("output"), str):
                await self.error(event, "invalid_type", "Invalid type for 'item.output': expected a string")
            elif item.get("type") == "message" and (
                item.get("role") not in ("system", "user", "assistant") or not isinstance(content, list) or not content
            ):
                await self.error(event, "invalid_value", "Invalid message item")
            elif item.get("type") not in ("function_call_output", "message"):
                await self.error(event, "invalid_value", f"Invalid item type {item.get('type')!r}")
            else:  # confirmed with the GA events, the item carrying the client's id if it gave one
                item = {**item, "id": item.get("id") or self.next_id("item")}
                self.item_ids.add(item["id"])
                await self.send({"type": "conversation.item.added", "previous_item_id": None, "item": item})
                await self.send({"type": "conversation.item.done", "previous_item_id": None, "item": item})

    async def answer_response_create(self, metadata: Any) -> None:
        response_id = self.next_id("resp")
        response = {"id": response_id, "status": "in_progress", "output": [], "metadata": metadata}
        await self.send({"type": "response.created", "response": response})
        await self.send({"type": "output_audio_buffer.started", "response_id": response_id})
        await asyncio.sleep(self.speak_seconds)
        self.response_active = False
        message = {"id": self.next_id("item"), "type": "message", "role": "assistant", "status": "completed", "content": []}
        await self.send({"type": "response.output_audio_transcript.done", "response_id": response_id, "item_id": message["id"],
                         "output_index": 0, "content_index": 0, "transcript": GREETING_SPOKEN})  # sent with no setting
        await self.send({"type": "response.done",
                         "response": {**response, "status": "completed", "output": [message], "usage": USAGE}})
        await asyncio.sleep(self.audio_tail)
        await self.send({"type": "output_audio_buffer.stopped", "response_id": response_id})

    async def error(self, event: dict[str, Any], code: str, message: str, param: str | None = None) -> None:
        error = {"type": "error", "error": {"type": "invalid_request_error", "code": code, "message": message,
                                              "param": param, "event_id": event.get("event_id")}}
        self.errors.append(error)
        await self.send(error)

    async def press(self, keys: str) -> None:
        """The caller types on the keypad: one DTMF event per key, as on a SIP call."""
        for key in keys:
            await self.send({"type": "input_audio_buffer.dtmf_event_received", "event": key, "received_at": int(time.time())})

    def notes(self) -> list[str]:
        """Texts of system messages the client added to the conversation."""
        return [
            e["item"]["content"][0]["text"] for e in self.received
            if e.get("type") == "conversation.item.create" and e["item"].get("type") == "message"
        ]

    async def drop(self, code: int, reason: str = "") -> None:
        """The sideband breaks while the call goes on: a close frame with `code`, or (1006) a dead TCP connection."""
        assert self.ws is not None and self.transport is not None
        ws, self.ws = self.ws, None
        for task in self._tasks:
            task.cancel()
        if code == 1006:
            self.transport.abort()
        else:
            await ws.close(code=code, message=reason.encode())
        self.response_active = False  # the fake's model is cut off mid-response too

    async def caller_hangs_up(self, clean: bool = False) -> None:
        """The caller puts the phone down: the sideband just dies, no close frame (docs/protocol.md, step 4), unless
        `clean`; from then on a handshake or a hangup gets 404."""
        self.state = "ended"
        if self.ws is not None and clean:
            await self.ws.close(code=aiohttp.WSCloseCode.OK)
        elif self.ws is not None:
            await self.drop(1006)

    async def caller_speaks(self, function_calls: list[tuple[str, str]] = ()) -> list[str]:  # type: ignore[assignment]
        """Server VAD hears the caller: speech_started, speech_stopped, committed, the caller's item, then a response
        nobody asked for."""
        await self.wait_idle()
        item_id = self.next_id("item")
        await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 1000, "item_id": item_id})
        await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 2000, "item_id": item_id})
        await self.send({"type": "input_audio_buffer.committed", "previous_item_id": None, "item_id": item_id})
        item = {"id": item_id, "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        await self.send({"type": "conversation.item.added", "previous_item_id": None, "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": None, "item": item})
        return await self.model_response(function_calls, audio_seconds=0.05)


class FakeOpenAI:
    """OpenAI's /v1/realtime/calls/{id}/accept|reject|hangup and the ?call_id= sideband."""

    def __init__(self) -> None:
        self.calls: dict[str, FakeCall] = {}
        self.rest: list[tuple[str, str]] = []  # (action, call_id) of every authorised REST request
        self.models_retrieved: list[str] = []  # ids asked for with GET /v1/models/{model}, key right or wrong
        self.model_delay = 0.0  # how long GET /v1/models/{model} takes to answer
        self.app = web.Application()
        self.app.router.add_post("/v1/realtime/calls/{call_id}/{action}", self.call_control)
        self.app.router.add_get("/v1/realtime", self.sideband)
        self.app.router.add_get("/v1/models/{model}", self.retrieve_model)
        self.app.on_shutdown.append(self.close_sidebands)
        self.url = ""
        self.closing = False

    async def close_sidebands(self, app: web.Application) -> None:
        self.closing = True
        for call in self.calls.values():
            if call.ws is not None:
                await call.ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)

    def ring(self, call_id: str) -> FakeCall:
        """A SIP INVITE arrived: the call exists and waits for accept or reject."""
        self.calls[call_id] = FakeCall(call_id)
        return self.calls[call_id]

    def authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {API_KEY}"

    async def retrieve_model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model}: the model object if the key's project may use it, else 404 model_not_found."""
        model = request.match_info["model"]
        self.models_retrieved.append(model)
        await asyncio.sleep(self.model_delay)
        if not self.authorised(request):
            return web.json_response(error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"), status=401)
        if model not in REALTIME_MODELS:
            message = f"The model '{model}' does not exist or you do not have access to it."
            return web.json_response(error_body(message, "invalid_request_error", "model_not_found"), status=404)
        return web.json_response({"id": model, "object": "model", "created": 1779000000, "owned_by": "system",
                                  "shutdown_date": SHUTDOWN_DATES.get(model)})

    async def call_control(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return web.json_response(error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"), status=401)
        call_id, action = request.match_info["call_id"], request.match_info["action"]
        self.rest.append((action, call_id))
        call = self.calls.get(call_id)
        not_found = web.json_response(
            error_body("No session found for the provided call_id", "invalid_request_error", "call_id_not_found"), status=404
        )
        if call is None or action not in ("accept", "reject", "hangup"):
            return not_found
        if action == "accept":
            await asyncio.sleep(call.accept_delay)
            if call.accept_script:
                status = call.accept_script.pop(0)
                return web.json_response(error_body("The server had an error", "server_error"), status=status)
            if call.state != "ringing":
                return not_found
            body = await request.json()
            audio = body.get("audio") or {}
            problems = type_problems(body, CallAcceptParams, "session")
            if "reasoning" in body and body.get("model") not in REASONING_MODELS:
                problems.append("session.reasoning: unknown parameter")  # (not recorded either: a guess)
            if problems:
                param = problems[0].split(":")[0]
                return web.json_response(error_body(f"Unknown parameter: '{param}'.", "invalid_request_error",
                                                    "unknown_parameter", param), status=400)
            if any("format" in (audio.get(side) or {}) for side in ("input", "output")):
                return web.json_response(error_body("Do not set audio format for SIP calls", "invalid_request_error"), status=400)
            for field in set((audio.get("input") or {}).get("turn_detection") or {}) - {"type", "idle_timeout_ms"}:
                param = f"session.audio.input.turn_detection.{field}"  # as seen on SIP (openai-agents-js#741)
                message = f"Unknown parameter: '{param}'."
                return web.json_response(error_body(message, "invalid_request_error", "unknown_parameter", param), status=400)
            checks = [("model", body.get("model"), REALTIME_MODELS),
                      ("audio.output.voice", (audio.get("output") or {}).get("voice"), VOICES)]
            if "input" in audio:  # input transcription is optional (and billed)
                checks.append(("audio.input.transcription.model", audio["input"]["transcription"]["model"], TRANSCRIPTION_MODELS))
            for param, value, known in checks:
                if value not in known:
                    message = f"Invalid value: {value!r}. Supported values are: {', '.join(sorted(known))}."
                    return web.json_response(error_body(message, "invalid_request_error", "invalid_value", param), status=400)
            call.accept_body, call.state, call.accepted_at = body, "accepted", time.monotonic()
            call.accept_seen = call.on_accept() if call.on_accept else None
            if call.answers_lost:
                call.answers_lost -= 1
                return web.Response(status=502, text="Bad Gateway")
        elif action == "reject":
            if call.state != "ringing":
                return not_found
            call.reject_body, call.state = await request.json(), "rejected"
        else:  # hangup
            if call.hangup_script:
                return web.json_response(error_body("The server had an error", "server_error"), status=call.hangup_script.pop(0))
            if call.state != "accepted":
                return not_found
            call.state, call.hangup_at = "ended", time.monotonic()
            if call.ws is not None:
                await call.ws.close(code=aiohttp.WSCloseCode.OK)
        return web.Response(status=200)

    async def sideband(self, request: web.Request) -> web.StreamResponse:
        call = self.calls.get(request.query.get("call_id", ""))
        if call is not None:
            call.sideband_attempts.append((time.monotonic(), request.query_string, dict(request.headers)))
        if not self.authorised(request):
            return web.json_response(error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"), status=401)
        if "model" in request.query:
            # The seed bug: ?model= opens a brand-new session that never sees the call. Make it loud.
            return web.json_response(error_body("this fake only serves call sidebands", "invalid_request_error"), status=400)
        not_found = web.json_response(
            error_body("No session found for the provided call_id", "invalid_request_error", "call_id_not_found"), status=404
        )
        if call is None or call.state != "accepted" or call.accept_body is None or call.accept_body.get("type") != "realtime":
            return not_found
        if call.sideband_down:
            return web.Response(status=503, text="upstream restarting")
        if call.handshake_hangs:
            await asyncio.sleep(3600)
        if call.sideband_404s > 0:
            call.sideband_404s -= 1
            return not_found
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if "OpenAI-Beta" in request.headers:
            await ws.close(code=4000, message=b"beta_api_shape_disabled")
            return ws
        if self.closing or call.close_on_connect:
            await ws.close(code=call.close_on_connect or aiohttp.WSCloseCode.GOING_AWAY)
            return ws
        call.ws, call.transport = ws, request.transport
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                event = json.loads(msg.data)
                call.received.append({**event, "_at": time.monotonic()})
                await call.on_client_event(event)
        if call.ws is ws:
            for task in call._tasks:
                task.cancel()
        return ws


# --- Fake OpenClaw gateway ------------------------------------------------------------------------------


class FakeOpenClaw:
    """The gateway's OpenAI-compatible /v1/chat/completions, with switchable failure modes."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []  # bodies of authorised requests
        self.cancelled: list[dict[str, Any]] = []  # requests the client abandoned mid-answer
        self.delay = 0.0
        self.mode = "ok"  # ok | empty | garbage | 500 | disabled | huge (a 10 MiB answer) | huge 500 (a 10 MiB error)
        # | deep (an answer of JSON nested 100,000 deep) | deep 500 (an error body nested 20,000 deep)
        self.agents = {"main"}  # the gateway's agents.entries; "main" is the default agent
        self.answer: Callable[[str], str] = lambda question: f"Answer to: {question}"
        self.error_message = "upstream model failed"  # of the 500
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.url = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "disabled":
            return web.Response(status=404, text="Not Found", content_type="text/plain")
        if request.headers.get("Authorization") != f"Bearer {CLAW_TOKEN}":
            return web.json_response({"error": {"message": "Unauthorized", "type": "unauthorized"}}, status=401)
        body = await request.json()
        model = str(body.get("model", ""))

        def invalid(message: str) -> web.Response:
            return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=400)

        # As OpenClaw 2026.9.6: the model names the agent, which is checked before the messages.
        if not re.fullmatch(r"openclaw([:/].+)?", model):
            return invalid("Invalid `model`. Use `openclaw` or `openclaw/<agentId>`.")
        agent = model[len("openclaw:"):] or "default"
        if agent == "default" and len(self.agents) > 1:
            return invalid("Multiple agents are configured, but this operation has no explicit owner. Use `openclaw/<agentId>`.")
        if agent.replace("default", "main") not in self.agents:
            return invalid(f"Unknown agent '{agent}'.")
        questions = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
        if not questions:
            return invalid("Missing user message in `messages`.")
        self.requests.append(body)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:  # aiohttp cancels the handler when the client disconnects
            self.cancelled.append(body)
            raise
        if self.mode == "500":
            return web.json_response({"error": {"message": self.error_message, "type": "api_error"}}, status=500)
        if self.mode == "garbage":
            return web.Response(text="<html>proxy error</html>", content_type="text/html")
        if self.mode == "deep":  # JSON too deep for any parser to follow
            return web.Response(text="[" * 100_000 + "]" * 100_000, content_type="application/json")
        if self.mode == "deep 500":
            return web.Response(status=500, text='{"error": ' * 20_000, content_type="application/json")
        if self.mode.startswith("huge"):  # streamed in 64 KiB pieces, so only the client could hold it all
            resp = web.StreamResponse(status=500 if self.mode == "huge 500" else 200, headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            try:
                await resp.write(b'{"choices": [{"message": {"role": "assistant", "content": "')
                for _ in range(160):
                    await resp.write(b"blah " * 13107)
                await resp.write(b'"}}]}')
            except ConnectionError:  # the client stopped reading
                self.cancelled.append(body)
            return resp
        content = "No response from OpenClaw." if self.mode == "empty" else self.answer(questions[-1])
        return web.json_response({
            "id": "chatcmpl_1", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        })


# --- A TCP proxy that can black-hole the sideband ----------------------------------------------------------


class BlackHoleProxy:
    """Sits between voicebridge and the fake OpenAI; black_hole() makes the open sidebands swallow every byte,
    both ways, without a FIN or RST: a dead NAT entry or a stalled proxy, noticed only by a missing pong."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.links: dict[int, list[asyncio.StreamWriter]] = {}  # link number -> both ends
        self.sidebands: set[int] = set()  # links that carry a sideband (REST links are left alone)
        self.dead: set[int] = set()
        self.server: asyncio.Server | None = None
        self._numbers = itertools.count()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.link, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = next(self._numbers)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.links[number] = [writer, up_writer]
        await asyncio.gather(self.pump(number, reader, up_writer), self.pump(number, up_reader, writer), return_exceptions=True)
        for end in self.links.pop(number):
            end.close()

    async def pump(self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if data.startswith(b"GET /v1/realtime?"):
                self.sidebands.add(number)
            if number not in self.dead:
                writer.write(data)
                await writer.drain()
        writer.close()

    def black_hole(self) -> None:
        self.dead.update(self.sidebands & self.links.keys())

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for ends in self.links.values():
            for end in ends:
                end.transport.abort()


# --- Fixtures -------------------------------------------------------------------------------------


@pytest.fixture
async def openai(aiohttp_server: Any) -> FakeOpenAI:
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("/v1"))
    return fake


@pytest.fixture
async def openclaw(aiohttp_server: Any) -> FakeOpenClaw:
    fake = FakeOpenClaw()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


def make_env(openai: FakeOpenAI, openclaw: FakeOpenClaw, **overrides: str) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_WEBHOOK_SECRET": SECRET,
        "OPENAI_BASE_URL": openai.url,
        "OPENCLAW_URL": openclaw.url,
        "OPENCLAW_TOKEN": CLAW_TOKEN,
        "ALLOWED_CALLERS": ALICE,
        "STATE_DIR": tempfile.mkdtemp(prefix="voicebridge-test-state-"),  # each bridge its own: no restart to resume
        **overrides,
    }


Bridge = Callable[..., Awaitable[Any]]


@pytest.fixture
async def start_bridge(openai: FakeOpenAI, openclaw: FakeOpenClaw, aiohttp_client: Any) -> Bridge:
    """Start voicebridge's app on a real socket: start_bridge(ENV_VAR="...", config_field=value). (The fakes first,
    so they stop last: the app's shutdown still reaches them.)"""

    async def start(**overrides: Any) -> Any:
        env = {k: v for k, v in overrides.items() if k.isupper()}
        fields = {k: v for k, v in overrides.items() if not k.isupper()}
        config = dataclasses.replace(config_from(make_env(openai, openclaw, **env)), **fields)
        return await aiohttp_client(make_app(config))

    return start


@pytest.fixture
async def bridge(start_bridge: Bridge) -> Any:
    return await start_bridge()


async def post_webhook(bridge: Any, body: bytes, headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    resp = await bridge.post("/webhook", data=body, headers=sign(body) if headers is None else headers)
    await resp.read()
    return resp


def calls_over(bridge: Any) -> bool:
    """No call is live, and every call's task has finished: hung up, recorded and summed up in the log."""
    return not bridge.app[voicebridge.CALLS] and not bridge.app[voicebridge.TASKS]


async def active_calls(bridge: Any) -> int:
    resp = await bridge.get("/healthz")
    return (await resp.json())["active_calls"]


async def connected_call(bridge: Any, openai: FakeOpenAI, call_id: str = "rtc_happy") -> FakeCall:
    """Ring, deliver the webhook, and wait until the sideband is up and the greeting has been spoken."""
    call = openai.ring(call_id)
    resp = await post_webhook(bridge, incoming_event(call_id))
    assert resp.status == 200
    await eventually(lambda: call.ws is not None and call.response_creates())
    await call.wait_idle()
    return call


# --- Webhook signatures ---------------------------------------------------------------------------------


def test_known_good_vector_from_openai_python() -> None:
    secret = "whsec_RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c="
    body = (b'{"id": "evt_685c059ae3a481909bdc86819b066fb6", "object": "event", "created_at": 1750861210, '
            b'"type": "response.completed", "data": {"id": "resp_123"}}')
    headers = {
        "webhook-id": "wh_685c059ae39c8190af8c71ed1022a24d",
        "webhook-timestamp": "1750861210",
        "webhook-signature": "v1,gUAg4R2hWouRZqRQG4uJypNS8YK885G838+EHb4nKBY=",
    }
    key = voicebridge.parse_webhook_secret(secret)[0]
    verify_signature(key, headers, body, now=1750861210)
    verify_signature(key, headers, body, now=1750861210 + 299)
    with pytest.raises(voicebridge.SignatureError, match="5 minutes"):
        verify_signature(key, headers, body, now=1750861210 + 301)
    with pytest.raises(voicebridge.SignatureError, match="no webhook-signature matches"):
        verify_signature(key, headers, body.replace(b"resp_123", b"resp_124"), now=1750861210)
    # Several signatures (secret rotation): any one matching is enough.
    rotated = {**headers, "webhook-signature": "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= " + headers["webhook-signature"]}
    verify_signature(key, rotated, body, now=1750861210)
    with pytest.raises(voicebridge.SignatureError):
        verify_signature(key, {**headers, "webhook-signature": headers["webhook-signature"].replace("v1,", "v2,")}, body, now=1750861210)


def _bad_headers(body: bytes) -> dict[str, dict[str, str]]:
    good = sign(body)
    other_secret = "whsec_" + base64.b64encode(b"some-other-projects-secret-00000").decode()
    return {
        "forged": {**good, "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()},
        "wrong secret": sign(body, secret=other_secret),
        "stale": sign(body, timestamp=int(time.time()) - 301),
        "future": sign(body, timestamp=int(time.time()) + 301),
        "no id": {k: v for k, v in good.items() if k != "webhook-id"},
        "no timestamp": {k: v for k, v in good.items() if k != "webhook-timestamp"},
        "no signature": {k: v for k, v in good.items() if k != "webhook-signature"},
        "timestamp not a number": {**good, "webhook-timestamp": "yesterday"},
        "signed other id": {**good, "webhook-id": "wh_replayed_under_new_id"},
        "only v2": {**good, "webhook-signature": good["webhook-signature"].replace("v1,", "v2,")},
    }


@pytest.mark.parametrize("case", list(_bad_headers(b"{}")))
async def test_unverified_webhook_is_400_and_nothing_happens(
    bridge: Any, openai: FakeOpenAI, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    call = openai.ring("rtc_forged")
    body = incoming_event("rtc_forged")
    resp = await post_webhook(bridge, body, _bad_headers(body)[case])
    assert resp.status == 400
    assert "invalid webhook signature" in await resp.text()
    await asyncio.sleep(0.1)
    assert openai.rest == [] and call.state == "ringing"
    assert "webhook rejected" in caplog.text and "Traceback" not in caplog.text


async def test_several_signatures_one_valid(bridge: Any, openai: FakeOpenAI) -> None:
    openai.ring("rtc_rotated")
    body = incoming_event("rtc_rotated")
    headers = sign(body)
    headers["webhook-signature"] = "v1,bm90IGl0 " + headers["webhook-signature"] + " v1,YWxzbyBub3Q="
    assert (await post_webhook(bridge, body, headers)).status == 200
    await eventually(lambda: ("accept", "rtc_rotated") in openai.rest)


async def test_other_event_types_get_2xx_and_are_ignored(bridge: Any, openai: FakeOpenAI) -> None:
    body = json.dumps({"object": "event", "id": "evt_1", "type": "response.completed", "created_at": 1, "data": {"id": "resp_1"}}).encode()
    resp = await post_webhook(bridge, body)
    assert resp.status == 200 and "ignored" in await resp.text()
    await asyncio.sleep(0.05)
    assert openai.rest == []


async def test_oversized_body_is_413(bridge: Any, openai: FakeOpenAI) -> None:
    body = incoming_event("rtc_big").replace(b'"object"', b'"padding": "' + b"x" * 70_000 + b'", "object"')
    resp = await post_webhook(bridge, body)
    assert resp.status == 413

    async def chunked() -> Any:  # no Content-Length: must still stop at the limit
        for _ in range(100):
            yield b"x" * 1024

    resp = await bridge.post("/webhook", data=chunked(), headers=sign(b"irrelevant"))
    assert resp.status == 413
    assert openai.rest == []


async def open_trickle(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[None]]:
    """A client that sends a webhook's headers, then its body a byte every 0.1 s (a slowloris): never done."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n")

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.1)

    return reader, writer, asyncio.create_task(trickle())


async def test_a_body_that_trickles_in_gets_408_in_time(
    bridge: Any, openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(voicebridge, "BODY_TIMEOUT", 0.5)
    started = time.monotonic()
    reader, writer, trickle = await open_trickle(bridge.server.host, bridge.server.port)
    try:
        status_line = await asyncio.wait_for(reader.readline(), 3)
        assert status_line.split()[1:2] == [b"408"], status_line
        assert 0.5 <= time.monotonic() - started < 1.5
        assert b"did not arrive" in await asyncio.wait_for(reader.read(1000), 3)
    finally:
        trickle.cancel()
        writer.close()
    assert openai.rest == [] and "Traceback" not in caplog.text


async def test_a_flood_of_unsigned_posts_makes_a_few_log_lines_that_count_the_rest(
    bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    body = incoming_event("rtc_flood")
    for _ in range(200):
        assert (await post_webhook(bridge, body, {})).status == 400
    await asyncio.sleep(1.0)
    assert (await post_webhook(bridge, body, {})).status == 400  # a second later: logged, with the count
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 2 <= len(lines) <= 4 and all(line.startswith("webhook rejected: missing webhook-id") for line in lines)
    held = [int(n) for line in lines for n in re.findall(r" \(and (\d+) more since the last line\)$", line)]
    assert len(lines) + sum(held) == 201 and lines[-1].endswith("more since the last line)"), lines
    assert openai.rest == []


async def test_signed_garbage_is_400(bridge: Any, openai: FakeOpenAI) -> None:
    incomplete = json.dumps({"type": "realtime.call.incoming", "data": {}}).encode()
    too_deep = (b"[" * 30_000 + b"]" * 30_000, b'{"a": ' * 10_000)  # RecursionError, not ValueError
    for body in (b"not json", b"[1, 2]", incomplete, *too_deep):
        resp = await post_webhook(bridge, body)
        assert resp.status == 400, body
    assert openai.rest == []


# --- Deduplication ---------------------------------------------------------------------------------------


async def test_retried_and_duplicated_deliveries_accept_once(bridge: Any, openai: FakeOpenAI) -> None:
    call = openai.ring("rtc_dup")
    body = incoming_event("rtc_dup")
    headers = sign(body)
    # The same delivery five times at once, then OpenAI's retry with a new webhook-id.
    responses = await asyncio.gather(*(post_webhook(bridge, body, headers) for _ in range(5)))
    assert [r.status for r in responses] == [200] * 5
    assert (await post_webhook(bridge, body)).status == 200
    await eventually(lambda: call.ws is not None)
    await asyncio.sleep(0.2)
    assert openai.rest.count(("accept", "rtc_dup")) == 1
    assert len(call.sideband_attempts) == 1


async def test_dedup_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(voicebridge, "RECENT_IDS", 3)
    seen: dict[str, None] = {}
    assert all(voicebridge.first_time(seen, k) for k in "abcd")
    assert not voicebridge.first_time(seen, "d") and not voicebridge.first_time(seen, "c")
    assert voicebridge.first_time(seen, "a")  # forgotten: at most 3 are remembered
    assert len(seen) == 3


# --- Caller screen ----------------------------------------------------------------------------------------

FROM_FORMS = {
    "name and sip uri": f'"Alice" <sip:{ALICE}@sip.example.com>;tag=9fxced76sl',
    "tel uri": f"<tel:{ALICE}>",
    "bare sip uri": f"sip:{ALICE}@203.0.113.5;tag=abc",
    "sips, user=phone": f"<sips:{ALICE};user=phone@carrier.example>;tag=1",
    "display name with <": f'"A <b> c" <sip:{ALICE}@host>',
    "00 prefix": "<sip:0015551234567@host>",
}


@pytest.mark.parametrize("form", list(FROM_FORMS))
async def test_allowed_caller_in_every_from_form_is_accepted(bridge: Any, openai: FakeOpenAI, form: str) -> None:
    assert caller_number([{"name": "From", "value": FROM_FORMS[form]}]) == ALICE
    call = openai.ring("rtc_form")
    assert (await post_webhook(bridge, incoming_event("rtc_form", FROM_FORMS[form]))).status == 200
    await eventually(lambda: call.ws is not None)


@pytest.mark.parametrize(
    "from_value,allowed",
    [
        ('"Bob" <sip:+15559999999@sip.example.com>;tag=1', ALICE),
        ('"Anonymous" <sip:anonymous@anonymous.invalid>;tag=1', ALICE),
        ("<sip:restricted@host>", ALICE),
        ("", ALICE),
        (f"<tel:{ALICE}>", ""),  # empty list: nobody gets in
        ('"Bob" <sip:+15559999999@sip.example.com>;tag=1', f"{ALICE},{BOB}=family"),  # routes, but no "*"
        ('"Anonymous" <sip:anonymous@anonymous.invalid>;tag=1', f"{ALICE},{BOB}=family"),
    ],
)
async def test_screened_out_callers_are_rejected_with_603(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture,
    from_value: str, allowed: str,
) -> None:
    bridge = await start_bridge(ALLOWED_CALLERS=allowed)
    call = openai.ring("rtc_stranger")
    assert (await post_webhook(bridge, incoming_event("rtc_stranger", from_value))).status == 200
    await eventually(lambda: call.state == "rejected")
    assert call.reject_body == {"status_code": 603}
    assert ("accept", "rtc_stranger") not in openai.rest and call.sideband_attempts == []
    assert "+15559999999" not in caplog.text and ALICE not in caplog.text
    assert "not in ALLOWED_CALLERS" in caplog.text


async def test_star_lets_withheld_numbers_in(start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    bridge = await start_bridge(ALLOWED_CALLERS="*")
    call = openai.ring("rtc_anon")
    await post_webhook(bridge, incoming_event("rtc_anon", '"Anonymous" <sip:anonymous@anonymous.invalid>'))
    await eventually(lambda: call.ws is not None)
    await call.wait_idle()
    await call.model_response([("ask_openclaw", '{"request": "hi"}')])
    await eventually(lambda: openclaw.requests)
    assert openclaw.requests[0]["user"] == "voicebridge:call:rtc_anon"  # withheld callers never share a session


async def test_each_caller_reaches_their_own_agent(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="voicebridge")
    openclaw.agents = {"main", "family", "guest"}
    bridge = await start_bridge(ALLOWED_CALLERS=f"{ALICE}, {BOB}=family, *=guest")
    callers = {"rtc_owner": f"<tel:{ALICE}>", "rtc_family": f"<tel:{BOB}>", "rtc_stranger": "<tel:+15559999999>",
               "rtc_withheld": '"Anonymous" <sip:anonymous@anonymous.invalid>'}
    for call_id, from_value in callers.items():
        call = openai.ring(call_id)
        await post_webhook(bridge, incoming_event(call_id, from_value))
        await eventually(lambda: call.ws is not None)
        await call.wait_idle()
        await call.model_response([("ask_openclaw", json.dumps({"request": f"who am I? ({call_id})"}))])
        await eventually(lambda: call.outputs())
        await call.caller_hangs_up()
    asked = {r["messages"][1]["content"].split("(")[1][:-1]: (r["model"], r["user"], r["messages"][0]["content"])
             for r in openclaw.requests}
    assert {call_id: model for call_id, (model, _, _) in asked.items()} == {
        "rtc_owner": "openclaw:main", "rtc_family": "openclaw:family",
        "rtc_stranger": "openclaw:guest", "rtc_withheld": "openclaw:guest"}
    assert {call_id: user for call_id, (_, user, _) in asked.items()} == {
        "rtc_owner": f"voicebridge:{ALICE}", "rtc_family": f"voicebridge:{BOB}",
        "rtc_stranger": "voicebridge:+15559999999", "rtc_withheld": "voicebridge:call:rtc_withheld"}
    assert asked["rtc_family"][2].endswith(f"Caller ID: {BOB} (caller ID can be faked).")
    assert asked["rtc_withheld"][2].endswith("Caller ID: withheld.")
    await eventually(lambda: calls_over(bridge))
    for line in ("[rtc_family] webhook verified, caller +1******4321 allowed, agent family",
                 "[rtc_withheld] webhook verified, caller withheld allowed, agent guest",
                 "[rtc_stranger] call summary: caller=+1******9999 agent=guest"):
        assert line in caplog.text
    assert ALICE not in caplog.text and BOB not in caplog.text  # the numbers went to OpenClaw, not to the log


async def test_an_agent_openclaw_does_not_know_is_named_in_the_log(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = await start_bridge(ALLOWED_CALLERS=f"{ALICE}=family")  # the gateway only has "main"
    call = await connected_call(bridge, openai)
    await call.model_response([("ask_openclaw", '{"request": "hello?"}')])
    await eventually(lambda: call.outputs())
    assert call.outputs()[0]["output"] == voicebridge.SAY_UNREACHABLE
    assert ("OpenClaw failed: HTTP 400: Unknown agent 'family'. (check the ALLOWED_CALLERS entry +1******4567=family, "
            "or add the agent to OpenClaw's agents.entries)") in caplog.text


def test_routing_entries_are_checked_at_startup(caplog: pytest.LogCaptureFixture) -> None:
    good = {"OPENAI_API_KEY": "sk-x", "OPENAI_WEBHOOK_SECRET": SECRET}
    cases = {
        "ALLOWED_CALLERS: in '+15557654321=Family', 'Family' is not an OpenClaw agent id (lowercase": f"{ALICE},{BOB}=Family",
        "ALLOWED_CALLERS: in '*=', '' is not an OpenClaw agent id": "*=",
        "ALLOWED_CALLERS: in '*=-guest', '-guest' is not": "*=-guest",
        "ALLOWED_CALLERS: in '*=my guest', 'my guest' is not": "*=my guest",
        f"ALLOWED_CALLERS: in '*={'a' * 65}'": f"*={'a' * 65}",
        "ALLOWED_CALLERS: '' is not an E.164 number like +15551234567, nor *": "=family",
        "ALLOWED_CALLERS lists +1******4567 twice, for agents 'main' and 'family': keep one entry": f"{ALICE},+1 555 123 4567=family",
        "ALLOWED_CALLERS lists * twice, for agents 'guest' and 'main'": "*=guest,*",
    }
    for message, callers in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from({**good, "ALLOWED_CALLERS": callers})
    with pytest.raises(ConfigError, match=re.escape("OPENCLAW_AGENT='Main' is not an OpenClaw agent id")):
        config_from({**good, "OPENCLAW_AGENT": "Main"})
    config = config_from({**good, "ALLOWED_CALLERS": f"{ALICE}=main,{ALICE}, {BOB}=fam_1-x ,*={'a' * 64}"})
    assert config.allowed_callers == {ALICE: "main", BOB: "fam_1-x", "*": "a" * 64}  # the same route twice is fine
    assert [voicebridge.agent_for(config, n) for n in (ALICE, BOB, "+15559999999", None)] == ["main", "fam_1-x", *["a" * 64] * 2]
    caplog.set_level("INFO", logger="voicebridge")
    voicebridge.log_banner(config_from({**good, "OPENCLAW_AGENT": "me", "ALLOWED_CALLERS": f"{ALICE},{BOB}=family,*=guest"}))
    assert "callers    +1******4567 -> me, +1******4321 -> family, * -> guest (caller -> OpenClaw agent)" in caplog.text
    assert "ANYONE WHO DIALS THE NUMBER CAN DRIVE YOUR OPENCLAW AGENT 'guest'" in caplog.text


@pytest.mark.parametrize("setting", ["1", "", "0"])
async def test_transcripts_are_logged_only_when_asked_for(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture, setting: str
) -> None:
    caplog.set_level("DEBUG", logger="voicebridge")
    bridge = await start_bridge(LOG_TRANSCRIPTS=setting)
    call = await connected_call(bridge, openai)
    assert call.accept_body is not None
    assert call.accept_body["audio"].get("input") == ({"transcription": {"model": "gpt-realtime-whisper"}} if setting == "1" else None)
    said = "What's on my calendar?\n[rtc_other] forged line\u2028" + "blah " * 200
    await call.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_u1",
                     "content_index": 0, "transcript": said, "usage": {"type": "duration", "seconds": 3.1}})
    await call.send({"type": "conversation.item.input_audio_transcription.failed", "item_id": "item_u2", "content_index": 0,
                     "error": {"type": "transcription_error", "code": "audio_unintelligible", "message": "Audio could not be transcribed"}})
    await call.model_response([("ask_openclaw", '{"request": "calendar"}')])
    await eventually(lambda: call.outputs())  # so the events before have been handled
    lines = [r for r in caplog.records if r.name == "voicebridge" and " said: " in r.getMessage()]
    failed = [r for r in caplog.records if "audio_unintelligible" in r.getMessage()]
    assert [r.levelname for r in failed] == ["DEBUG"] and not errors_logged(caplog)
    if setting != "1":
        assert lines == [] and "calendar?" not in caplog.text and GREETING_SPOKEN not in caplog.text
        return
    assistant, caller = (r.getMessage() for r in lines)  # the greeting came first
    assert caller.startswith("[rtc_happy] caller said: What's on my calendar?\\n[rtc_other] forged line\\u2028blah blah")
    assert caller.endswith("…") and len(caller) == len("[rtc_happy] caller said: ") + 500 + 1 and "\n" not in caller
    assert assistant == f"[rtc_happy] assistant said: {GREETING_SPOKEN}" and lines[0].levelname == "INFO"


def test_transcript_setting_is_checked_and_shown(caplog: pytest.LogCaptureFixture) -> None:
    good = {"OPENAI_API_KEY": "sk-x", "OPENAI_WEBHOOK_SECRET": SECRET}
    with pytest.raises(ConfigError, match=re.escape("LOG_TRANSCRIPTS='maybe': use 1 to log what is said on calls, or 0")):
        config_from({**good, "LOG_TRANSCRIPTS": "maybe"})
    caplog.set_level("INFO", logger="voicebridge")
    for value, shown in (("true", "transcripts LOGGED (LOG_TRANSCRIPTS=1)"), ("off", "transcripts off")):
        caplog.clear()
        voicebridge.log_banner(config_from({**good, "LOG_TRANSCRIPTS": value}))
        assert shown in caplog.text


def test_from_header_parser_edge_cases() -> None:
    assert caller_number([{"name": "f", "value": f"<tel:{ALICE}>"}]) == ALICE  # compact form
    assert caller_number([{"name": "To", "value": f"<tel:{ALICE}>"}]) is None
    assert caller_number("not a list") is None
    assert caller_number([None, 3, {"name": "From"}]) is None
    assert caller_number([{"name": "From", "value": "<tel:+1-555-123-4567>"}]) == ALICE  # RFC 3966 visual separators
    assert caller_number([{"name": "From", "value": "<sip:+123@host>"}]) is None  # too short for E.164
    assert voicebridge.mask(ALICE) == "+1******4567" and voicebridge.mask(None) == "withheld"


# --- The happy path, end to end ---------------------------------------------------------------------------------


async def test_a_call_from_webhook_to_spoken_answer(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="voicebridge")
    call = await connected_call(bridge, openai, "rtc_479a275623b54bdb9b6fbae2f7cbd408")
    assert await active_calls(bridge) == 1

    # Accept carried a phone session with both tools and no audio format.
    body = call.accept_body
    assert body is not None
    assert body["type"] == "realtime" and body["model"] == "gpt-realtime-2.1"
    assert body["model"] not in SHUTDOWN_DATES and "reasoning" not in body  # (REASONING_EFFORT: the model's own)
    assert body["audio"] == {"output": {"voice": "marin"}}
    assert [t["name"] for t in body["tools"]] == ["ask_openclaw", "end_call"]
    assert body["tools"][0]["parameters"]["required"] == ["request"]
    assert "checking" in body["tools"][0]["description"]
    assert body["tool_choice"] == "auto" and "phone" in body["instructions"]

    # The sideband: ?call_id= only, Bearer, no OpenAI-Beta, opened after accept; greeting first.
    at, query, headers = call.sideband_attempts[0]
    assert query == "call_id=rtc_479a275623b54bdb9b6fbae2f7cbd408"
    assert headers["Authorization"] == f"Bearer {API_KEY}" and "OpenAI-Beta" not in headers
    assert call.accepted_at is not None and at > call.accepted_at
    assert call.received[0]["type"] == "response.create" and "Greet" in call.received[0]["response"]["instructions"]

    # The model asks; OpenClaw answers; the answer goes back as a function_call_output + response.create.
    [fc_id] = await call.model_response([("ask_openclaw", '{ "request" : "What is on my calendar tomorrow?" }')])
    await eventually(lambda: call.outputs())
    assert call.outputs() == [{"type": "function_call_output", "call_id": fc_id, "output": "Answer to: What is on my calendar tomorrow?"}]
    output_event = next(e for e in call.received if e["type"] == "conversation.item.create")
    assert re.fullmatch(r"[A-Za-z0-9_]{1,32}", output_event["item"]["id"])  # our own id: short and plain
    assert call.received[-1]["type"] == "response.create" and call.received[-1]["_at"] >= output_event["_at"]
    assert "response" not in call.received[-1]  # the output lives in the conversation, not in response.input
    assert all(e.get("event_id") for e in call.received)

    [request] = openclaw.requests
    assert request["model"] == "openclaw:main" and request["user"] == f"voicebridge:{ALICE}"
    assert request["messages"][0]["role"] == "system" and "phone" in request["messages"][0]["content"]
    assert f"Caller ID: {ALICE} " in request["messages"][0]["content"]  # the full number, to the owner's gateway only
    assert request["messages"][1] == {"role": "user", "content": "What is on my calendar tomorrow?"}
    await call.wait_idle()
    assert call.errors == []

    await call.caller_hangs_up()
    await eventually(lambda: openai.calls and calls_over(bridge))
    assert await active_calls(bridge) == 0

    # The log tells the story, with the call id on every line, and no secrets or full numbers.
    story = [r.getMessage() for r in caplog.records if r.name == "voicebridge"]
    for expected in ("webhook verified, caller +1******4567 allowed, agent main", "call accepted in", "sideband connected",
                     "function call ask_openclaw: its response completed", "OpenClaw answered in", "result sent for",
                     "sideband closed (code 1006)", "sideband refused (HTTP 404): the call is over",
                     "call summary: caller=+1******4567 agent=main duration=", "tool_calls=1 openclaw_seconds=0.0 reason=caller_hung_up"):
        assert any(expected in line for line in story), expected
    assert all(line.startswith("[rtc_479a275623b54bdb9b6fbae2f7cbd408]") for line in story)
    # An ordinary hangup (no close frame, then 404) is no fault: nothing above INFO, and still a /hangup of ours.
    assert not [r for r in caplog.records if r.name == "voicebridge" and r.levelno > logging.INFO]
    assert openai.rest[-1] == ("hangup", "rtc_479a275623b54bdb9b6fbae2f7cbd408")
    assert ALICE not in caplog.text and API_KEY not in caplog.text and CLAW_TOKEN not in caplog.text
    assert "Traceback" not in caplog.text


async def test_two_questions_in_a_row_keep_the_caller_session(bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    call = await connected_call(bridge, openai)
    for n, question in enumerate(("first?", "second?"), 1):
        await call.model_response([("ask_openclaw", json.dumps({"request": question}))])
        await eventually(lambda: len(call.outputs()) == n)
        await call.wait_idle()
    assert [o["output"] for o in call.outputs()] == ["Answer to: first?", "Answer to: second?"]
    assert {r["user"] for r in openclaw.requests} == {f"voicebridge:{ALICE}"}
    assert call.errors == []


# --- Accept and sideband timing --------------------------------------------------------------------------------


async def test_accept_5xx_is_retried_then_the_call_proceeds(bridge: Any, openai: FakeOpenAI) -> None:
    call = openai.ring("rtc_flaky")
    call.accept_script = [500, 503]
    await post_webhook(bridge, incoming_event("rtc_flaky"))
    await eventually(lambda: call.ws is not None)
    assert openai.rest.count(("accept", "rtc_flaky")) == 3
    assert call.accepted_at is not None and all(at > call.accepted_at for at, _, _ in call.sideband_attempts)


async def test_accept_404_means_the_caller_hung_up(bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    # Never rung: OpenAI no longer knows the call.
    await post_webhook(bridge, incoming_event("rtc_gone"))
    await eventually(lambda: "call is gone" in caplog.text)
    await asyncio.sleep(0.1)
    assert openai.rest == [("accept", "rtc_gone")]  # no retry, no sideband
    assert await active_calls(bridge) == 0
    assert "Traceback" not in caplog.text


async def test_accept_that_keeps_failing_gives_up_within_seconds(bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    call = openai.ring("rtc_down")
    call.accept_script = [503] * 10
    started = time.monotonic()
    await post_webhook(bridge, incoming_event("rtc_down"))
    await eventually(lambda: "giving up" in caplog.text, timeout=10)
    assert time.monotonic() - started < 6
    assert 2 <= openai.rest.count(("accept", "rtc_down")) <= 6
    # Its outcome is unknown (an accept can take effect while its answer is lost): one look, then a hangup.
    await eventually(lambda: ("hangup", "rtc_down") in openai.rest)
    assert len(call.sideband_attempts) == 1 and await active_calls(bridge) == 0


async def test_accept_401_says_check_the_key(start_bridge: Bridge, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    bridge = await start_bridge(OPENAI_API_KEY="sk-wrong")
    openai.ring("rtc_badkey")
    await post_webhook(bridge, incoming_event("rtc_badkey"))
    await eventually(lambda: "check OPENAI_API_KEY" in caplog.text)
    assert "Incorrect API key provided" in caplog.text and "sk-wrong" not in caplog.text


@pytest.mark.parametrize("setting", [{"REALTIME_MODEL": "gpt-realtime-9"}, {"VOICE": "robot"}])
async def test_accept_400_names_the_settings_that_shape_the_accept_body(
    start_bridge: Bridge, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, setting: dict[str, str]
) -> None:
    bridge = await start_bridge(**setting)
    call = openai.ring("rtc_badmodel")
    await post_webhook(bridge, incoming_event("rtc_badmodel"))
    await eventually(lambda: calls_over(bridge))
    [line] = [r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()]
    assert f"HTTP 400: Invalid value: {next(iter(setting.values()))!r}" in line  # OpenAI's message, quoted
    assert "(check REALTIME_MODEL, VOICE, INSTRUCTIONS and LOG_TRANSCRIPTS: they shape the accept body)" in line
    assert line.startswith("[rtc_badmodel]") and "reason=error" in caplog.text
    assert openai.rest == [("accept", "rtc_badmodel")] and call.sideband_attempts == []  # a 400 is not retried


async def test_sideband_404_right_after_accept_is_retried(bridge: Any, openai: FakeOpenAI) -> None:
    call = openai.ring("rtc_race")
    call.sideband_404s = 2
    await post_webhook(bridge, incoming_event("rtc_race"))
    await eventually(lambda: call.ws is not None)
    assert len(call.sideband_attempts) == 3


async def test_sideband_that_stays_404_is_given_up(bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    call = openai.ring("rtc_never")
    call.sideband_404s = 100
    await post_webhook(bridge, incoming_event("rtc_never"))
    await eventually(lambda: calls_over(bridge), timeout=20)
    assert "sideband unavailable, giving up" in caplog.text
    assert 8 <= len(call.sideband_attempts) <= 12 and await active_calls(bridge) == 0
    assert call.sideband_attempts[-1][0] - call.sideband_attempts[0][0] >= 7.5  # nobody has measured the race: ~8 s
    assert not [r for r in caplog.records if "sideband not ready" in r.getMessage() and r.levelno > logging.DEBUG]
    # OpenAI may still hold the call: it is hung up, not left to a model that cannot reach OpenClaw.
    assert call.state == "ended" and "reason=sideband_lost" in caplog.text


async def test_the_fake_refuses_what_the_real_server_refuses(openai: FakeOpenAI) -> None:
    """The fake can fail: ?model=, a call not yet accepted, and OpenAI-Beta are all refused."""
    call = openai.ring("rtc_strict")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    ws_base = openai.url.replace("http", "ws") + "/realtime"
    async with aiohttp.ClientSession() as http:
        for url in (f"{ws_base}?model=gpt-realtime", f"{ws_base}?call_id=rtc_strict"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await http.ws_connect(url, headers=auth)
            assert exc.value.status in (400, 404)
        call.state, call.accept_body = "accepted", {"type": "realtime"}
        async with http.ws_connect(f"{ws_base}?call_id=rtc_strict", headers={**auth, "OpenAI-Beta": "realtime=v1"}) as ws:
            await ws.receive()
            assert ws.close_code == 4000
        # The SIP accept refuses turn-detection tuning (docs/protocol.md, step 7), so voicebridge never sends any.
        tuned = {"type": "realtime", "model": "gpt-realtime-2.1", "audio": {"output": {"voice": "marin"},
                 "input": {"turn_detection": {"type": "server_vad", "threshold": 0.6}}}}
        openai.ring("rtc_tuned")
        async with http.post(f"{openai.url}/realtime/calls/rtc_tuned/accept", json=tuned, headers=auth) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["message"] == "Unknown parameter: 'session.audio.input.turn_detection.threshold'."
    assert "turn_detection" not in json.dumps(voicebridge.accept_payload(config_from(make_env(openai, FakeOpenClaw()))))


# --- Tool calls -------------------------------------------------------------------------------------------------


async def test_function_call_in_an_interrupted_response_is_not_run(bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    call = await connected_call(bridge, openai)
    await call.model_response([("ask_openclaw", '{"request": "delete all my email"}')], status="cancelled")
    await asyncio.sleep(0.2)
    assert openclaw.requests == [] and call.outputs() == []
    # The call goes on: the next, completed, call is run.
    await call.model_response([("ask_openclaw", '{"request": "read my email"}')])
    await eventually(lambda: call.outputs())
    assert [r["messages"][-1]["content"] for r in openclaw.requests] == ["read my email"]


@pytest.mark.parametrize(
    "arguments",
    ["not json", '{"request": 42}', '{"question": "hi"}', '{"request": "   "}', "[]", '"a string"', "x" * 50_000],
)
async def test_bad_arguments_get_an_error_output_and_the_call_continues(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, arguments: str
) -> None:
    call = await connected_call(bridge, openai)
    [fc_id] = await call.model_response([("ask_openclaw", arguments)])
    await eventually(lambda: call.outputs())
    assert call.outputs()[0]["call_id"] == fc_id and call.outputs()[0]["output"].startswith("Error:")
    assert openclaw.requests == []
    await call.wait_idle()
    await call.model_response([("ask_openclaw", '{"request": "and now?"}')])
    await eventually(lambda: len(call.outputs()) == 2)
    assert call.errors == []


async def test_unknown_tool_gets_an_error_output(bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    call = await connected_call(bridge, openai)
    [fc_id] = await call.model_response([("transfer_money", '{"to": "mallory"}')])
    await eventually(lambda: call.outputs())
    assert call.outputs() == [{"type": "function_call_output", "call_id": fc_id,
                               "output": "Error: there is no tool named 'transfer_money'. Use ask_openclaw or end_call."}]
    assert openclaw.requests == [] and call.errors == []


@pytest.mark.parametrize(
    "setup,say,hint",
    [
        ({"mode": "500"}, "couldn't reach", "HTTP 500: upstream model failed"),
        ({"mode": "empty"}, "didn't have an answer", "empty answer"),
        ({"mode": "garbage"}, "couldn't reach", "not a chat completion"),
        ({"mode": "deep"}, "couldn't reach", "not a chat completion"),
        ({"mode": "deep 500"}, "couldn't reach", 'HTTP 500: {"error": {"error": '),
        ({"mode": "disabled"}, "couldn't reach", "enable gateway.http.endpoints.chatCompletions"),
        ({"token": "wrong"}, "couldn't reach", "HTTP 401: Unauthorized (check OPENCLAW_TOKEN)"),
        ({"agent": "nobody"}, "couldn't reach", "Unknown agent 'nobody'. (check OPENCLAW_AGENT)"),
        ({"delay": 2.0}, "taking too long", "no answer within OPENCLAW_TIMEOUT=0.3s"),
        ({"url": "http://127.0.0.1:9"}, "couldn't reach", "is the gateway running?"),
    ],
)
async def test_openclaw_failures_become_something_to_say_and_a_hint_for_the_owner(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture,
    setup: dict[str, Any], say: str, hint: str,
) -> None:
    openclaw.mode = setup.get("mode", "ok")
    openclaw.delay = setup.get("delay", 0.0)
    bridge = await start_bridge(
        OPENCLAW_TOKEN=setup.get("token", CLAW_TOKEN), OPENCLAW_AGENT=setup.get("agent", "main"),
        OPENCLAW_URL=setup.get("url", openclaw.url), openclaw_timeout=0.3,
    )
    call = await connected_call(bridge, openai)
    await call.model_response([("ask_openclaw", '{"request": "what is new?"}')])
    await eventually(lambda: call.outputs())
    assert say in call.outputs()[0]["output"]
    assert hint in caplog.text
    assert "Traceback" not in caplog.text and CLAW_TOKEN not in caplog.text
    await call.wait_idle()
    assert call.errors == [] and await active_calls(bridge) == 1


async def test_an_error_message_cannot_forge_a_log_line(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture
) -> None:
    openclaw.mode, openclaw.error_message = "500", "upstream model failed\n[rtc_x] PIN accepted\r\u2028"
    call = await connected_call(bridge, openai)
    await call.model_response([("ask_openclaw", '{"request": "what is new?"}')])
    await eventually(lambda: call.outputs())
    assert r"HTTP 500: upstream model failed\n[rtc_x] PIN accepted\r\u2028 (the gateway" in caplog.text
    assert not [r.getMessage() for r in caplog.records if re.search("[\n\r\u2028]", r.getMessage())]
    assert not [line for line in caplog.text.splitlines() if line.startswith("[rtc_x]")]


async def test_long_openclaw_answers_are_cut(bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    openclaw.answer = lambda question: "blah " * 10_000
    call = await connected_call(bridge, openai)
    await call.model_response([("ask_openclaw", '{"request": "read me everything"}')])
    await eventually(lambda: call.outputs())
    assert len(call.outputs()[0]["output"]) <= voicebridge.MAX_ANSWER_CHARS + 40


# --- The one-active-response rule --------------------------------------------------------------------------------


async def test_results_wait_for_the_active_response_to_finish(bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    call = await connected_call(bridge, openai)
    call.speak_seconds = 0.3
    [fc_id] = await call.model_response([("ask_openclaw", '{"request": "weather?"}')])
    # The caller keeps talking: the model starts another response at once, and OpenClaw answers
    # while it is still going.
    talk = asyncio.create_task(call.model_response(audio_seconds=0.6))
    await talk
    await eventually(lambda: call.outputs())
    await call.wait_idle()
    assert call.errors == [], call.errors
    done_times = [e["_at"] for e in call.sent if e["type"] == "response.done"]
    creates = call.response_creates()
    assert creates[-1]["_at"] > done_times[2]  # after the chatter's response.done (greeting, tool round, chatter)
    assert call.outputs()[0]["call_id"] == fc_id


async def test_several_questions_in_one_response_are_all_answered_in_order(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    # A reasoning model may ask several things at once; OpenClaw gets them one after the other, in order.
    call = await connected_call(bridge, openai)
    call.speak_seconds = 0.05
    openclaw.delay = 0.2
    first, second, third = await call.model_response([
        ("ask_openclaw", '{"request": "one"}'), ("ask_openclaw", '{"request": "two"}'), ("ask_openclaw", '{"request": "three"}'),
    ])
    await eventually(lambda: len(call.outputs()) == 3)
    assert [(o["call_id"], o["output"]) for o in call.outputs()] == [
        (first, "Answer to: one"), (second, "Answer to: two"), (third, "Answer to: three")]
    assert [r["messages"][-1]["content"] for r in openclaw.requests] == ["one", "two", "three"]
    await call.wait_idle()
    assert call.errors == []


async def test_a_question_from_a_later_response_waits_for_the_running_one(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    call = await connected_call(bridge, openai)
    openclaw.delay = 0.4
    [first] = await call.model_response([("ask_openclaw", '{"request": "one"}')])
    await eventually(lambda: openclaw.requests)
    [second] = await call.model_response([("ask_openclaw", '{"request": "two"}')])
    await eventually(lambda: len(call.outputs()) == 2)
    outputs = {o["call_id"]: o["output"] for o in call.outputs()}
    assert "still being worked on" in outputs[second] and outputs[first] == "Answer to: one"
    assert [r["messages"][-1]["content"] for r in openclaw.requests] == ["one"]
    await call.wait_idle()
    # Once the first answer is in, the next question goes through.
    await call.model_response([("ask_openclaw", '{"request": "two"}')])
    await eventually(lambda: len(call.outputs()) == 3)
    assert call.outputs()[-1]["output"] == "Answer to: two"
    assert call.errors == []


async def test_a_refused_response_create_is_sent_again(bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    """If the server starts a response just as we ask for one, the refused request is repeated after it."""
    call = await connected_call(bridge, openai)
    call_obj = bridge.app[voicebridge.CALLS]["rtc_happy"]
    call.response_active = True  # the server has started one, but its response.created is still in flight
    goodbye = {"instructions": voicebridge.SHUTDOWN_GOODBYE, "tool_choice": "none"}
    await call_obj.sideband.request_response(goodbye)
    await eventually(lambda: call.errors)
    call.response_active = False
    await call.model_response()  # that in-flight response now shows up and finishes
    await eventually(lambda: len(call.response_creates()) == 3)
    await call.wait_idle()
    assert len(call.errors) == 1
    assert call.response_creates()[-1]["response"] == goodbye  # repeated as it was asked for


# --- Ending calls ---------------------------------------------------------------------------------------------------


async def test_end_call_hangs_up_after_the_goodbye_has_played(bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="voicebridge")
    call = await connected_call(bridge, openai)
    await call.model_response([("end_call", "{}")], audio_seconds=0.4)
    await eventually(lambda: call.hangup_at)
    stopped = [e["_at"] for e in call.sent if e["type"] == "output_audio_buffer.stopped"][-1]
    assert call.hangup_at is not None and call.hangup_at >= stopped
    await eventually(lambda: calls_over(bridge))
    assert "end_call" in caplog.text and "reason=end_call" in caplog.text


async def test_caller_hanging_up_mid_question_aborts_the_openclaw_request(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture
) -> None:
    openclaw.delay = 10
    call = await connected_call(bridge, openai)
    await call.model_response([("ask_openclaw", '{"request": "summarise my inbox"}')])
    await eventually(lambda: openclaw.requests)
    await call.caller_hangs_up()
    await eventually(lambda: openclaw.cancelled, timeout=2)
    await eventually(lambda: calls_over(bridge))
    assert await active_calls(bridge) == 0 and not bridge.app[voicebridge.TASKS]
    assert "Traceback" not in caplog.text


async def test_max_call_seconds_hangs_up(start_bridge: Bridge, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    bridge = await start_bridge(max_call_seconds=0.5)
    call = await connected_call(bridge, openai)
    await eventually(lambda: call.state == "ended")
    assert ("hangup", "rtc_happy") in openai.rest
    await eventually(lambda: calls_over(bridge))
    assert "MAX_CALL_SECONDS" in caplog.text and "reason=max_duration" in caplog.text


async def test_sideband_survives_junk_from_the_server(bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    call = await connected_call(bridge, openai)
    assert call.ws is not None
    await call.ws.send_str("this is not json")
    await call.ws.send_bytes(b"\x00\x01binary")
    for junk in ([1, 2], {"type": "response.done"}, {"type": "response.done", "response": "x"},
                 {"type": "response.done", "response": {"status": "completed", "output": [None, {"type": "function_call"}]}},
                 {"type": "error"}, {"type": "error", "error": None}, {"type": "something.new", "x": 1}):
        await call.ws.send_json(junk)
    await call.model_response([("ask_openclaw", '{"request": "still there?"}')])
    await eventually(lambda: call.outputs())
    assert call.outputs()[0]["output"] == "Answer to: still there?"


# --- The keypad PIN -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", ["2468", "2468#", "13*2468#", "9*2468"])
async def test_pin_unlocks_ask_openclaw(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture, keys: str
) -> None:
    caplog.set_level("DEBUG", logger="voicebridge")
    bridge = await start_bridge(CALL_PIN="2468")
    call = await connected_call(bridge, openai)
    assert call.accept_body is not None and "PIN" in call.accept_body["instructions"]
    [before] = await call.model_response([("ask_openclaw", '{"request": "read my email"}')])
    await eventually(lambda: call.outputs())
    assert call.outputs()[0] == {"type": "function_call_output", "call_id": before, "output": voicebridge.PIN_NEEDED}
    assert openclaw.requests == []
    await call.wait_idle()

    await call.press(keys)
    await eventually(lambda: call.notes())
    assert call.notes() == [voicebridge.PIN_ACCEPTED]
    await call.wait_idle()
    assert call.received[-1]["type"] == "response.create"  # the model is asked to confirm
    await call.model_response([("ask_openclaw", '{"request": "read my email"}')])
    await eventually(lambda: len(call.outputs()) == 2)
    assert call.outputs()[1]["output"] == "Answer to: read my email"
    await call.wait_idle()
    assert call.errors == []
    ours = [r.getMessage() for r in caplog.records if r.name == "voicebridge"]
    assert "[rtc_happy] PIN accepted" in ours and not any("2468" in line for line in ours)


async def test_three_wrong_pins_hang_up(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = await start_bridge(CALL_PIN="2468")
    call = await connected_call(bridge, openai)
    for attempt, keys in enumerate(["1111", "2467#", "1357#2468"], 1):  # the right PIN after the third failure is too late
        await call.press(keys)
        await eventually(lambda: len([e for e in call.received if e["type"] == "response.create"]) > attempt)
        await call.wait_idle()
    assert call.notes() == [voicebridge.PIN_WRONG] * 2  # and no PIN_ACCEPTED
    goodbye = call.response_creates()[-1]["response"]
    assert goodbye == {"instructions": voicebridge.PIN_GOODBYE, "tool_choice": "none", "metadata": {"voicebridge": "goodbye"}}
    await eventually(lambda: call.state == "ended")
    assert call.hangup_at is not None and call.hangup_at >= [e["_at"] for e in call.sent if e["type"] == "output_audio_buffer.stopped"][-1]
    await eventually(lambda: calls_over(bridge))
    assert openclaw.requests == [] and "reason=pin_failed" in caplog.text
    ours = [r.getMessage() for r in caplog.records if r.name == "voicebridge"]
    assert "[rtc_happy] wrong PIN (3 of 3)" in ours and not any("1111" in line or "2467" in line for line in ours)


async def test_no_pin_configured_means_no_pin_talk(bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    call = await connected_call(bridge, openai)
    assert call.accept_body is not None and "PIN" not in call.accept_body["instructions"]
    await call.press("1234#")
    await call.model_response([("ask_openclaw", '{"request": "hi"}')])
    await eventually(lambda: call.outputs())
    assert call.notes() == [] and call.outputs()[0]["output"] == "Answer to: hi"


def test_pin_must_be_digits() -> None:
    good = {"OPENAI_API_KEY": "sk-x", "OPENAI_WEBHOOK_SECRET": SECRET}
    for bad in ("12a4", "123", "1234567890123", "12 34"):
        with pytest.raises(ConfigError, match="CALL_PIN"):
            config_from({**good, "CALL_PIN": bad})
    assert config_from({**good, "CALL_PIN": "0042"}).call_pin == "0042"


# --- Surviving a real network: reconnects, slow answers ----------------------------------------------------


@pytest.mark.parametrize("code", [1006, 1011, 1012])
async def test_sideband_reconnects_after_an_abnormal_drop(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    call = await connected_call(bridge, openai)
    await call.drop(code)
    await eventually(lambda: call.ws is not None)
    assert len(call.sideband_attempts) == 2 and call.sideband_attempts[1][1] == "call_id=rtc_happy"
    assert f"sideband closed (code {code})" in caplog.text and "sideband reconnected" in caplog.text
    # The call carries on over the new socket, and the greeting is not repeated.
    await call.model_response([("ask_openclaw", '{"request": "still there?"}')])
    await eventually(lambda: call.outputs())
    assert call.outputs()[0]["output"] == "Answer to: still there?"
    assert sum("Greet" in str(e.get("response")) for e in call.response_creates()) == 1
    assert await active_calls(bridge) == 1


async def test_a_result_that_finishes_while_disconnected_is_delivered_after_the_reconnect(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    call = await connected_call(bridge, openai)
    openclaw.delay = 0.2
    [fc_id] = await call.model_response([("ask_openclaw", '{"request": "long one"}')])
    await eventually(lambda: openclaw.requests)
    call.sideband_down = True  # the connection breaks and handshakes fail for a while ...
    await call.drop(1006)
    await asyncio.sleep(0.4)  # ... while OpenClaw answers
    assert call.outputs() == [] and len(call.sideband_attempts) >= 2
    call.sideband_down = False  # ... then the way is clear again
    await eventually(lambda: call.outputs(), timeout=10)
    assert call.outputs() == [{"type": "function_call_output", "call_id": fc_id, "output": "Answer to: long one"}]
    await call.wait_idle()
    assert call.errors == []


@pytest.mark.parametrize("how", ["404 on reconnect", "normal close", "hangup without a close frame", "after our hangup"])
async def test_no_reconnect_when_the_call_is_over(
    bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    call = await connected_call(bridge, openai)
    if how == "404 on reconnect":
        call.state = "ended"  # OpenAI has dropped the call: the handshake will be 404
        await call.drop(1011)
    elif how == "normal close":
        await call.caller_hangs_up(clean=True)
    elif how == "hangup without a close frame":
        await call.caller_hangs_up()
    else:
        await call.model_response([("end_call", "{}")])
    await eventually(lambda: calls_over(bridge))
    await asyncio.sleep(0.3)
    # A clean close is checked with one handshake (404: over); after our own hangup there is nothing to check.
    assert len(call.sideband_attempts) == (1 if how == "after our hangup" else 2)
    assert "giving up" not in caplog.text and not errors_logged(caplog)


async def test_reconnect_is_bounded(
    bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sum(voicebridge.RECONNECT_DELAYS) <= 10 and len(voicebridge.RECONNECT_DELAYS) <= 6
    monkeypatch.setattr(voicebridge, "RECONNECT_DELAYS", (0.05, 0.1, 0.2))
    call = await connected_call(bridge, openai)
    call.sideband_down = True
    await call.drop(1011)
    await eventually(lambda: calls_over(bridge))
    assert len(call.sideband_attempts) == 1 + 4
    assert "sideband unavailable, giving up: HTTP 503" in caplog.text
    await eventually(lambda: call.state == "ended")  # (the hangup goes out as the call's last act)
    assert ("hangup", "rtc_happy") in openai.rest and "reason=sideband_lost" in caplog.text


async def test_slow_openclaw_gets_a_filler_now_and_then(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(voicebridge, "FILLER_AFTER", 0.2)
    monkeypatch.setattr(voicebridge, "FILLER_EVERY", 0.5)
    openclaw.delay = 1.35
    call = await connected_call(bridge, openai)
    call.speak_seconds = 0.1
    asked_at = time.monotonic()
    await call.model_response([("ask_openclaw", '{"request": "slow one"}')])
    await eventually(lambda: call.outputs(), timeout=5)
    fillers = [e for e in call.response_creates() if e.get("response", {}).get("tool_choice") == "none"]
    assert len(fillers) in (2, 3), fillers
    assert all("still checking" in f["response"]["instructions"] for f in fillers)
    assert fillers[0]["_at"] - asked_at >= 0.2
    assert all(b["_at"] - a["_at"] >= 0.5 for a, b in itertools.pairwise(fillers))
    await call.wait_idle()
    await asyncio.sleep(0.7)
    assert len([e for e in call.response_creates() if e.get("response", {}).get("tool_choice") == "none"]) == len(fillers)
    assert call.errors == []  # never sent while a response was active


async def test_a_filler_does_not_talk_over_the_model(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(voicebridge, "FILLER_AFTER", 0.1)
    openclaw.delay = 0.8
    call = await connected_call(bridge, openai)
    await call.model_response([("ask_openclaw", '{"request": "slow"}')])
    await call.model_response(audio_seconds=0.5)  # the model is still talking when the filler is due
    await eventually(lambda: call.outputs(), timeout=5)
    await call.wait_idle()
    assert call.errors == []


async def test_a_filler_due_while_the_sideband_is_down_waits_for_the_reconnect(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="voicebridge")
    monkeypatch.setattr(voicebridge, "FILLER_AFTER", 0.1)
    monkeypatch.setattr(voicebridge, "RECONNECT_BACKOFF", (0.6, 1.0))
    openclaw.delay = 1.5
    call = await connected_call(bridge, openai)
    await call.model_response([("ask_openclaw", '{"request": "slow"}')])
    await call.drop(1011)  # before the filler is due, and the reconnect only comes 0.6 s later
    dropped = time.monotonic()
    await eventually(lambda: call.outputs(), timeout=5)
    fillers = [e for e in call.response_creates() if e.get("response", {}).get("tool_choice") == "none"]
    assert fillers and fillers[0]["_at"] - dropped >= 0.6  # said on the new sideband, not lost in the gap
    assert "not sent" not in caplog.text and call.errors == []


# --- Never strand a caller, never lose an answer --------------------------------------------------------------


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "voicebridge" and r.levelno >= logging.ERROR]


@pytest.mark.parametrize("how", ["503", "handshake never answers"])
async def test_a_first_attach_that_fails_hangs_up(
    bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setattr(voicebridge, "SIDEBAND_RETRY_DELAYS", (0.05, 0.05))
    monkeypatch.setattr(voicebridge, "HANDSHAKE_TIMEOUT", 0.3)
    call = openai.ring("rtc_noattach")
    call.sideband_down = how == "503"
    call.handshake_hangs = how == "handshake never answers"
    started = time.monotonic()
    await post_webhook(bridge, incoming_event("rtc_noattach"))
    await eventually(lambda: call.state == "ended")
    assert time.monotonic() - started < 3  # three handshakes, each bounded
    assert len(call.sideband_attempts) == 3 and openai.rest == [("accept", "rtc_noattach"), ("hangup", "rtc_noattach")]
    await eventually(lambda: "call summary" in caplog.text)
    assert "reason=sideband_lost" in caplog.text


def test_the_handshake_timeout_is_about_ten_seconds() -> None:
    assert 5 <= voicebridge.HANDSHAKE_TIMEOUT <= 15


async def test_a_hangup_that_fails_is_retried_then_logged_as_an_error(
    start_bridge: Bridge, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(voicebridge, "HANGUP_RETRY_DELAYS", (0.05, 0.05, 0.05))
    bridge = await start_bridge(max_call_seconds=0.3)  # the owner's cost cap is what asks for the hangup here
    call = openai.ring("rtc_happy")
    call.hangup_script = [500, 503]  # two failures, then OpenAI answers
    await post_webhook(bridge, incoming_event("rtc_happy"))
    await eventually(lambda: call.state == "ended")
    assert openai.rest.count(("hangup", "rtc_happy")) == 3 and errors_logged(caplog) == []

    other = openai.ring("rtc_stuck")
    other.hangup_script = [500] * 10  # OpenAI keeps failing
    await post_webhook(bridge, incoming_event("rtc_stuck"))
    await eventually(lambda: "call summary" in caplog.text and "[rtc_stuck] call summary" in caplog.text)
    assert openai.rest.count(("hangup", "rtc_stuck")) == 4
    [error] = errors_logged(caplog)
    assert error.getMessage().startswith("[rtc_stuck] hangup failed, giving up: HTTP 500")
    assert "reason=max_duration" in caplog.text


async def test_a_server_that_closes_every_sideband_at_once_gets_bounded_reconnects_then_a_hangup(
    bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(voicebridge.RECONNECT_BACKOFF) == 5 and voicebridge.RECONNECT_WINDOW >= 60
    backoff = (0.0, 0.1, 0.2, 0.3, 0.4)
    monkeypatch.setattr(voicebridge, "RECONNECT_BACKOFF", backoff)
    call = await connected_call(bridge, openai)
    call.close_on_connect = 1011  # the upgrade succeeds, then the server (or a proxy) closes at once
    await call.drop(1011)
    await eventually(lambda: call.state == "ended", timeout=5)
    times = [at for at, _, _ in call.sideband_attempts]
    assert len(times) == 1 + 5  # the first attach, then the budget of 5 reconnects
    for gap, wait in zip(itertools.pairwise(times[1:]), backoff[1:]):
        assert gap[1] - gap[0] >= wait * 0.9  # backoff between cycles, not only between failed handshakes
    await eventually(lambda: calls_over(bridge))
    assert "after 5 reconnects within 60s: giving up" in caplog.text and "reason=sideband_lost" in caplog.text


@pytest.mark.parametrize("code", [1008, 4000, 4999])
async def test_a_sideband_the_server_refuses_is_not_reconnected(
    bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    call = await connected_call(bridge, openai)
    await call.drop(code)
    await eventually(lambda: call.state == "ended")
    await asyncio.sleep(0.2)
    assert len(call.sideband_attempts) == 1
    assert f"sideband closed with code {code}: the server refuses this session, not reconnecting" in caplog.text


async def test_a_result_written_into_a_dead_connection_is_delivered_after_the_reconnect_exactly_once(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(voicebridge, "SIDEBAND_HEARTBEAT", 0.4)  # a dead path is noticed after ~0.6 s, not ~30 s
    proxy = BlackHoleProxy(int(openai.url.split(":")[-1].split("/")[0]))
    try:
        bridge = await start_bridge(OPENAI_BASE_URL=await proxy.start())
        call = await connected_call(bridge, openai)
        openclaw.delay = 0.3
        [fc_id] = await call.model_response([("ask_openclaw", '{"request": "long one"}')])
        await eventually(lambda: openclaw.requests)
        proxy.black_hole()  # the path dies silently while OpenClaw works
        await eventually(lambda: "result sent for" in caplog.text)  # written into the void
        assert call.outputs() == []
        await eventually(lambda: call.outputs(), timeout=5)
        assert "sideband closed (code 1006)" in caplog.text and len(call.sideband_attempts) == 2
        await call.wait_idle()
        await asyncio.sleep(0.2)
        assert call.outputs() == [{"type": "function_call_output", "call_id": fc_id, "output": "Answer to: long one"}]
        assert call.errors == []
        await call.caller_hangs_up()  # before the proxy goes away, or the call would try to reconnect through it
        await eventually(lambda: calls_over(bridge))
    finally:
        await proxy.close()


async def test_a_repeated_item_is_refused_by_its_id_not_added_twice(bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    # The item did arrive, but its confirmation was lost with the connection: the repeat cannot add it again.
    call = await connected_call(bridge, openai)
    call_obj = bridge.app[voicebridge.CALLS]["rtc_happy"]
    [fc_id] = await call.model_response([("ask_openclaw", '{"request": "one"}')])
    await eventually(lambda: call.outputs())
    await call.wait_idle()
    [sent] = [e["item"] for e in call.received if e["type"] == "conversation.item.create"]
    call_obj.sideband.unconfirmed[sent["id"]] = dict(sent)  # as if conversation.item.added had not come back
    await call.drop(1006)
    await eventually(lambda: call.errors)
    assert "already exists" in call.errors[0]["error"]["message"]
    assert call.outputs() == [{"type": "function_call_output", "call_id": fc_id, "output": "Answer to: one"}]


@pytest.mark.parametrize("where", ["tool", "call loop"])
async def test_a_crash_is_logged_once_and_the_call_hung_up(
    bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("injected failure")

    call = await connected_call(bridge, openai)
    monkeypatch.setattr(voicebridge, "ask_openclaw", broken)
    if where == "call loop":
        monkeypatch.setattr(voicebridge.Call, "_on_response_done", broken)
    await call.model_response([("ask_openclaw", '{"request": "boom"}')])
    await eventually(lambda: call.state == "ended")
    await eventually(lambda: calls_over(bridge))
    [error] = errors_logged(caplog)
    assert error.getMessage().startswith("[rtc_happy] unexpected error") and error.exc_info is not None
    assert "injected failure" in caplog.text and "reason=error" in caplog.text
    gc.collect()  # a crash nobody looked at would now be reported a second time, as "never retrieved"
    assert "never retrieved" not in caplog.text


async def test_the_greeting_is_not_replayed_after_the_caller_spoke_first(
    bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    call = openai.ring("rtc_eager")
    call.response_active = True  # the caller said "hello?" first: the model is already answering
    await post_webhook(bridge, incoming_event("rtc_eager"))
    await eventually(lambda: call.errors)  # our greeting is refused
    call.response_active = False
    await call.model_response(audio_seconds=0.1)  # the model's answer to the caller
    await call.model_response([("ask_openclaw", '{"request": "one"}')])
    await eventually(lambda: call.outputs())
    await call.wait_idle()
    await asyncio.sleep(0.2)
    greetings = [e for e in call.response_creates() if "Greet" in str(e.get("response"))]
    assert len(greetings) == 1 and len(call.errors) == 1


async def test_an_owed_goodbye_goes_out_before_the_hangup_even_with_results_waiting(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    call = await connected_call(bridge, openai)
    call_obj = bridge.app[voicebridge.CALLS]["rtc_happy"]
    openclaw.delay = 0.2
    [fc_id] = await call.model_response([("ask_openclaw", '{"request": "one"}')])
    await eventually(lambda: openclaw.requests)
    call.response_active = True  # the server has just started a response: our goodbye will be refused
    bye = asyncio.create_task(call_obj.hang_up_after_goodbye("shutdown", goodbye=voicebridge.SHUTDOWN_GOODBYE))
    await eventually(lambda: call.errors)
    await eventually(lambda: call_obj.sideband.outbox)  # and meanwhile the answer is in, waiting
    call.response_active = False
    await call.model_response()  # the server's response shows up and ends
    await bye
    goodbyes = [e for e in call.response_creates() if "goodbye" in str(e.get("response"))]
    assert len(goodbyes) == 2 and call.hangup_at is not None and goodbyes[-1]["_at"] < call.hangup_at
    stopped = [e["_at"] for e in call.sent if e["type"] == "output_audio_buffer.stopped"][-1]
    assert stopped > goodbyes[-1]["_at"] and call.hangup_at >= stopped  # the goodbye was heard
    assert call.outputs() == [{"type": "function_call_output", "call_id": fc_id, "output": "Answer to: one"}]
    assert len(call.errors) == 1


@pytest.mark.parametrize("mode", ["huge", "huge 500"])
async def test_a_huge_openclaw_body_is_not_read_whole(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    call = await connected_call(bridge, openai)
    openclaw.mode = mode  # 10 MiB
    tracemalloc.start()
    try:
        await call.model_response([("ask_openclaw", '{"request": "read me everything"}')])
        await eventually(lambda: call.outputs())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 2**20, f"{peak / 2**20:.1f} MiB allocated at the peak"  # reading it whole would take > 10
    if mode == "huge":
        assert call.outputs()[0]["output"] == voicebridge.SAY_TOO_LONG
        assert "the answer was over 256 KiB, so it was not read" in caplog.text
    else:
        assert call.outputs()[0]["output"] == voicebridge.SAY_UNREACHABLE
        assert "HTTP 500: an error body over 256 KiB" in caplog.text


async def test_a_failed_response_is_logged_with_its_details(bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    call = await connected_call(bridge, openai)
    details = {"type": "failed", "error": {"type": "server_error", "code": "internal_error", "message": "The model failed"}}
    await call.send({"type": "response.created", "response": {"id": "resp_f", "status": "in_progress", "output": []}})
    await call.send({"type": "response.done", "response": {"id": "resp_f", "status": "failed", "output": [], "status_details": details}})
    await eventually(lambda: "response failed" in caplog.text)
    [line] = [r.getMessage() for r in caplog.records if "response failed" in r.getMessage()]
    assert line.startswith("[rtc_happy]") and "The model failed" in line and "internal_error" in line


async def test_shutdown_has_one_deadline(
    bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert 30 + voicebridge.SHUTDOWN_AFTER_GRACE + 10 <= 60  # the default grace, and the unit's TimeoutStopSec
    assert "TimeoutStopSec=60" in (HERE / "voicebridge.service").read_text()
    monkeypatch.setattr(voicebridge, "SHUTDOWN_AFTER_GRACE", 0.5)
    monkeypatch.setattr(voicebridge, "HANGUP_RETRY_DELAYS", (1.0,) * 10)
    call = await connected_call(bridge, openai)
    call.hangup_script = [503] * 100  # OpenAI is down: the hangup would be retried for 10 s
    started = time.monotonic()
    await voicebridge.drain(bridge.app, grace=0.2)
    assert time.monotonic() - started < 0.2 + 0.5 + 0.5
    assert "shutting down: 1 call(s) not hung up in time" in caplog.text


# --- Locks that hold across calls ----------------------------------------------------------------------------


async def test_an_autodialler_locks_the_pin_line_for_every_new_call(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = await start_bridge(CALL_PIN="246813")
    owner = await connected_call(bridge, openai, "rtc_owner")  # already in, before the attack starts
    await owner.press("246813")
    await eventually(lambda: owner.notes() == [voicebridge.PIN_ACCEPTED])
    await owner.wait_idle()
    assert voicebridge.PIN_LOCK_AFTER == 10
    for n in range(5):  # 5 calls x 3 wrong PINs: the 10th wrong PIN (in the 4th call) locks the line
        call = openai.ring(f"rtc_dialler_{n}")
        await post_webhook(bridge, incoming_event(f"rtc_dialler_{n}"))
        if n == 4:
            await eventually(lambda: call.state == "rejected")
            assert call.reject_body == {"status_code": 603} and call.accept_body is None  # never a billed session
            break
        await eventually(lambda: call.ws is not None and call.response_creates())
        for attempt in range(3 if n < 3 else 1):  # the 10th locks the line, and this call is hung up at once
            await call.wait_idle()
            await call.press(f"{n}{attempt}0000")
            await eventually(lambda: caplog.text.count("wrong PIN (") == 3 * n + attempt + 1)
        await eventually(lambda: call.state == "ended")
    [lock] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "10 wrong PINs within 3600s, across calls: new calls are turned away until 20" in lock.getMessage()
    health = await (await bridge.get("/healthz")).json()
    lifts = datetime.fromisoformat(health["pin_locked_until"])
    assert 3500 < (lifts - datetime.now(timezone.utc)).total_seconds() <= 3600
    assert "too many wrong PINs, the line is locked until" in caplog.text
    # The owner, who typed the PIN before the lock, is not affected.
    await owner.model_response([("ask_openclaw", '{"request": "still working?"}')])
    await eventually(lambda: owner.outputs())
    assert owner.outputs()[0]["output"] == "Answer to: still working?"


def test_each_pin_lock_lasts_twice_as_long_as_the_one_before_up_to_a_day() -> None:
    lock, now, lengths = voicebridge.PinLock(), 1_000_000.0, []
    for _ in range(8):
        for wrong in range(10):
            now += 1
            assert lock.wrong_pin(now) == (wrong == 9)
        lengths.append(lock.until - now)
        now = lock.until
    assert lengths == [3600, 7200, 14400, 28800, 57600, 86400, 86400, 86400]
    fresh = voicebridge.PinLock()
    assert not any(fresh.wrong_pin(t * 400.0) for t in range(20))  # 9 an hour, spread out: never locks


async def test_a_caller_who_types_no_pin_is_hung_up_after_pin_timeout(
    start_bridge: Bridge, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = await start_bridge(CALL_PIN="2468", pin_timeout=0.3)
    call = await connected_call(bridge, openai)
    await eventually(lambda: call.state == "ended", timeout=3)
    assert any(voicebridge.PIN_TIMEOUT_GOODBYE in str(e.get("response")) for e in call.response_creates())
    await eventually(lambda: "call summary" in caplog.text)
    assert "no right PIN within PIN_TIMEOUT=0.3s" in caplog.text and "reason=pin_timeout" in caplog.text

    typed = await connected_call(bridge, openai, "rtc_typed")  # one who types it in time stays on
    await typed.press("2468")
    await asyncio.sleep(0.5)
    assert typed.state == "accepted"


async def test_a_stray_key_costs_one_strike_and_a_pause_forgets_a_half_typed_pin(
    start_bridge: Bridge, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(voicebridge, "PIN_IDLE", 0.3)
    bridge = await start_bridge(CALL_PIN="2468")
    call = await connected_call(bridge, openai)
    await call.press("12468#")  # "1246" is one wrong PIN; the "8#" left over costs nothing
    await eventually(lambda: call.notes())
    await call.wait_idle()
    await asyncio.sleep(0.1)
    assert call.notes() == [voicebridge.PIN_WRONG] and caplog.text.count("wrong PIN (") == 1
    await call.press("24")
    await asyncio.sleep(0.5)  # the caller hesitates, then starts again
    await call.press("2468")
    await eventually(lambda: len(call.notes()) == 2)
    assert call.notes()[-1] == voicebridge.PIN_ACCEPTED and caplog.text.count("wrong PIN (") == 1


async def test_max_concurrent_calls_turns_the_next_caller_away_busy(
    start_bridge: Bridge, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = await start_bridge(MAX_CONCURRENT_CALLS="2")
    first, second = await connected_call(bridge, openai, "rtc_one"), await connected_call(bridge, openai, "rtc_two")
    third = openai.ring("rtc_three")
    await post_webhook(bridge, incoming_event("rtc_three"))
    await eventually(lambda: third.state == "rejected")
    assert third.reject_body == {"status_code": 486} and third.accept_body is None
    health = await (await bridge.get("/healthz")).json()
    assert health["active_calls"] == 2 and health["max_concurrent_calls"] == 2
    assert "MAX_CONCURRENT_CALLS=2 calls are already live" in caplog.text
    await first.caller_hangs_up()
    await eventually(lambda: bridge.app[voicebridge.CALLS].keys() == {"rtc_two"})
    fourth = await connected_call(bridge, openai, "rtc_four")  # room again
    assert fourth.state == "accepted" and second.state == "accepted"


def test_settings_that_would_break_later_are_refused_and_a_hash_in_a_value_is_kept() -> None:
    good = {"OPENAI_API_KEY": "sk-x", "OPENAI_WEBHOOK_SECRET": SECRET}
    cases = {
        "MAX_CALL_SECONDS='nan' must be a number between 10 and": {**good, "MAX_CALL_SECONDS": "nan"},
        "OPENCLAW_TIMEOUT='inf' must be a number between 1 and": {**good, "OPENCLAW_TIMEOUT": "inf"},
        "PORT='70000' must be a number between 1 and 65,535": {**good, "PORT": "70000"},
        "MAX_CONCURRENT_CALLS='-1'": {**good, "MAX_CONCURRENT_CALLS": "-1"},
        "PIN_TIMEOUT='nan'": {**good, "PIN_TIMEOUT": "nan"},
    }
    for message, env in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from(env)
    config = config_from({**good, "OPENCLAW_TOKEN": "abc#not-a-comment", "MAX_CONCURRENT_CALLS": "0",
                              "INSTRUCTIONS": "Ask for the PIN, then #"})  # (comments are the file reader's to judge)
    assert config.openclaw_token == "abc#not-a-comment" and config.max_concurrent_calls == 0
    assert config.instructions == "Ask for the PIN, then #"


def test_only_the_env_file_beside_voicebridge_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-from-a-parent-directory\n")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "voicebridge.py").write_text((HERE / "voicebridge.py").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OPENCLAW_"))}
    run = [sys.executable, str(tmp_path / "app" / "voicebridge.py"), "--check"]
    result = subprocess.run(run, cwd=tmp_path / "app", env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 78 and "OPENAI_API_KEY is not set" in result.stdout
    (tmp_path / "app" / ".env").write_text("OPENAI_API_KEY=sk-beside\nOPENAI_WEBHOOK_SECRET=whsec_%%%\n")
    result = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert "OPENAI_WEBHOOK_SECRET is not valid base64" in result.stdout  # the key came from the .env beside it
    assert "OPENAI_API_KEY is not set" not in result.stdout


async def test_check_fails_on_an_empty_allowlist_and_warns_about_an_unknown_voice_and_a_short_pin(
    openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    code, output = await output_of(await run_voicebridge({**make_env(openai, openclaw), "ALLOWED_CALLERS": ""}, "--check"))
    assert code == 1 and "FAIL  no setting makes every call fail" in output and "ALLOWED_CALLERS is empty" in output
    env = {**make_env(openai, openclaw), "VOICE": "nova-2027", "CALL_PIN": "2468"}
    code, output = await output_of(await run_voicebridge(env, "--check"))
    assert code == 0 and "All good" in output, output
    assert "WARN  VOICE=nova-2027 is not one of the documented voices" in output
    assert "WARN  CALL_PIN has 4 digits: use 6 or more" in output


async def test_small_exposures(bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    # An unreadable caller number is not called "withheld", and is masked.
    call = openai.ring("rtc_local")
    await post_webhook(bridge, incoming_event("rtc_local", "<sip:0301234567@pbx.example.com>"))
    await eventually(lambda: call.state == "rejected")
    assert "from unreadable ('********67') with SIP 603" in caplog.text and "0301234567" not in caplog.text
    anonymous = openai.ring("rtc_anon")
    await post_webhook(bridge, incoming_event("rtc_anon", '"Anonymous" <sip:anonymous@anonymous.invalid>'))
    await eventually(lambda: anonymous.state == "rejected")
    assert "rejecting the call from withheld with SIP 603" in caplog.text
    # An absurd timestamp is a bad signature, not "not a JSON event".
    body = incoming_event("rtc_ts")
    resp = await post_webhook(bridge, body, {**sign(body), "webhook-timestamp": "9" * 4300})
    assert resp.status == 400 and "webhook-timestamp is not a number" in await resp.text()
    # A call id with a trailing newline is malformed ("$" would have let it through).
    assert (await post_webhook(bridge, incoming_event("rtc_nl\n"))).status == 200
    assert "call_id is malformed" in caplog.text and ("accept", "rtc_nl\n") not in openai.rest


async def test_barge_in_counts_as_the_goodbye_having_played(bridge: Any, openai: FakeOpenAI) -> None:
    call = await connected_call(bridge, openai)
    call.speak_seconds = 5  # a long goodbye ...
    call_obj = bridge.app[voicebridge.CALLS]["rtc_happy"]
    bye = asyncio.create_task(call_obj.hang_up_after_goodbye("shutdown", goodbye=voicebridge.SHUTDOWN_GOODBYE))
    await eventually(lambda: len(call.response_creates()) == 2)
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await call.send({"type": "output_audio_buffer.cleared", "response_id": "resp_x"})  # ... cut short by the caller
    await call.send({"type": "response.done", "response": {"id": "resp_x", "status": "cancelled", "output": [],
                                                          "metadata": voicebridge.GOODBYE_TAG}})
    await bye
    assert time.monotonic() - started < 1 and call.state == "ended"


# --- Every call ends on purpose: clean closes checked, silent lines hung up, state kept -------------------------


@pytest.mark.parametrize("code", [1000, 1001])
async def test_a_clean_close_of_a_live_call_is_checked_and_the_call_goes_on(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    call = await connected_call(bridge, openai)
    await call.drop(code)  # a proxy or backend rotating: the call itself is still live
    await eventually(lambda: call.ws is not None)
    assert len(call.sideband_attempts) == 2 and bridge.app[voicebridge.CALLS]["rtc_happy"].reconnects  # in the budget
    [fc_id] = await call.model_response([("ask_openclaw", '{"request": "still there?"}')])
    await eventually(lambda: call.outputs())
    assert call.outputs() == [{"type": "function_call_output", "call_id": fc_id, "output": "Answer to: still there?"}]
    assert ("hangup", "rtc_happy") not in openai.rest and f"sideband closed (code {code})" in caplog.text


async def test_the_60_minute_cap_ends_the_call_without_a_new_handshake(
    bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    call = await connected_call(bridge, openai)
    await call.drop(1001, "Your session hit the maximum duration of 60 minutes.")
    await eventually(lambda: calls_over(bridge))
    assert len(call.sideband_attempts) == 1 and openai.rest[-1] == ("hangup", "rtc_happy")
    assert "reason 'Your session hit the maximum duration of 60 minutes.'" in caplog.text
    assert "reason=max_duration" in caplog.text and not errors_logged(caplog)


async def test_an_accept_whose_answer_was_lost_is_looked_at_once_and_the_call_goes_on(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture
) -> None:
    call = openai.ring("rtc_lost")
    call.answers_lost = 1  # the accept takes effect, a proxy turns its answer into a 502, and the retry gets 404
    await post_webhook(bridge, incoming_event("rtc_lost"))
    await eventually(lambda: call.ws is not None and call.response_creates())
    assert openai.rest.count(("accept", "rtc_lost")) == 2 and len(call.sideband_attempts) == 1
    assert "accept's outcome is unknown (HTTP 404 after a failed try): trying the sideband once" in caplog.text
    await call.wait_idle()
    [fc_id] = await call.model_response([("ask_openclaw", '{"request": "are we on?"}')])
    await eventually(lambda: call.outputs())
    assert call.outputs()[0]["output"] == "Answer to: are we on?" and ("hangup", "rtc_lost") not in openai.rest


def idle_checks(call: FakeCall) -> list[dict[str, Any]]:
    return [e for e in call.response_creates() if (e.get("response") or {}).get("instructions") == voicebridge.IDLE_CHECK]


async def test_a_line_with_nobody_on_it_is_asked_once_then_hung_up(
    start_bridge: Bridge, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = await start_bridge(idle_seconds=0.5)
    call = await connected_call(bridge, openai)  # accepted, greeted, and then: nothing (the caller hung up ringing)
    stopped = await eventually(lambda: [e["_at"] for e in call.sent if e["type"] == "output_audio_buffer.stopped"])
    greeting_heard = max(stopped)  # (its .stopped comes just after response.done: waited for, not assumed)
    await eventually(lambda: idle_checks(call), timeout=3)
    [check] = idle_checks(call)
    assert check["response"]["tool_choice"] == "none" and check["_at"] - greeting_heard >= 0.45
    await eventually(lambda: call.state == "ended", timeout=3)
    goodbye = call.response_creates()[-1]
    assert goodbye["response"]["instructions"] == voicebridge.IDLE_GOODBYE and goodbye["_at"] - check["_at"] >= 0.45
    assert call.hangup_at is not None and call.hangup_at > goodbye["_at"]
    await eventually(lambda: "call summary" in caplog.text)
    assert "reason=idle" in caplog.text and len(idle_checks(call)) == 1


async def test_a_caller_who_keeps_talking_or_waits_for_a_slow_answer_is_never_hung_up_as_idle(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    bridge = await start_bridge(idle_seconds=0.5)
    call = await connected_call(bridge, openai)
    for _ in range(6):  # 1.8 s of conversation, with pauses shorter than IDLE_SECONDS
        await call.caller_speaks()
        await asyncio.sleep(0.3)
    openclaw.delay = 1.5  # three times IDLE_SECONDS with OpenClaw, and nobody says a word meanwhile
    [fc_id] = await call.caller_speaks([("ask_openclaw", '{"request": "slow one"}')])
    await eventually(lambda: call.outputs(), timeout=5)
    assert idle_checks(call) == [] and call.state == "accepted"
    await eventually(lambda: idle_checks(call), timeout=3)  # the silence after the answer does count
    assert idle_checks(call)[0]["_at"] > call.received[-2]["_at"]


@pytest.mark.parametrize("sign", ["speech_started", "keypad", "transcript", "caller's item", "unasked response"])
async def test_any_sign_of_the_caller_restarts_the_silence_clock(
    start_bridge: Bridge, openai: FakeOpenAI, sign: str
) -> None:
    bridge = await start_bridge(idle_seconds=0.5)
    call = await connected_call(bridge, openai)
    await eventually(lambda: idle_checks(call), timeout=3)
    await call.wait_idle()
    await asyncio.sleep(0.1)  # "Are you still there?" has been heard; now the caller shows they are
    if sign == "unasked response":
        await call.model_response(audio_seconds=0.05)
    else:
        signs: dict[str, dict[str, Any]] = {  # (speech_started holds the clock until the next sign: speech_stopped)
            "speech_started": {"type": "input_audio_buffer.speech_started", "audio_start_ms": 10, "item_id": "item_c"},
            "keypad": {"type": "input_audio_buffer.dtmf_event_received", "event": "5", "received_at": int(time.time())},
            "transcript": {"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_c",
                           "content_index": 0, "transcript": "yes, still here"},
            "caller's item": {"type": "conversation.item.added", "previous_item_id": None,
                              "item": {"id": "item_c", "type": "message", "role": "user", "content": []}},
        }
        await call.send(signs[sign])
        if sign == "speech_started":
            await asyncio.sleep(0.7)
            assert len(idle_checks(call)) == 1  # still speaking: the silence clock waits
            await call.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 900, "item_id": "item_c"})
    await asyncio.sleep(0.7)  # longer than IDLE_SECONDS: without the sign, this would have been the goodbye
    assert call.state == "accepted" and not any("goodbye" in str(e.get("response")) for e in call.response_creates())
    await eventually(lambda: len(idle_checks(call)) == 2, timeout=3)  # silence again: asked again, not hung up


def test_idle_seconds_is_off_or_at_least_ten() -> None:
    env = {"OPENAI_API_KEY": API_KEY, "OPENAI_WEBHOOK_SECRET": SECRET}
    assert config_from(env).idle_seconds == 30
    assert config_from({**env, "IDLE_SECONDS": "0"}).idle_seconds == 0
    assert config_from({**env, "IDLE_SECONDS": "10"}).idle_seconds == 10
    with pytest.raises(ConfigError, match="IDLE_SECONDS=5: use 0"):
        config_from({**env, "IDLE_SECONDS": "5"})


def live_rows(state_dir: str) -> list[tuple[Any, ...]]:
    """The store's live calls, read the way another process would: read-only, beside the running service."""
    with sqlite3.connect(f"file:{state_dir}/voicebridge.db?mode=ro", uri=True) as db:
        return db.execute("SELECT call_id, caller, agent, pin_ok, in_flight FROM live_calls").fetchall()


async def test_the_store_keeps_each_live_call_and_its_questions_in_flight_privately(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, tmp_path: Path
) -> None:
    state_dir = str(tmp_path / "new" / "state")
    bridge = await start_bridge(STATE_DIR=state_dir)
    assert (tmp_path / "new" / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "new" / "state" / "voicebridge.db").stat().st_mode & 0o777 == 0o600
    call = await connected_call(bridge, openai)  # (pin_ok 0: a PIN typed, and with no CALL_PIN none was)
    await eventually(lambda: live_rows(state_dir) == [("rtc_happy", ALICE, "main", 0, "[]")])
    openclaw.delay = 0.5
    [fc_id] = await call.model_response([("ask_openclaw", '{"request": "slow one"}')])
    await eventually(lambda: live_rows(state_dir) == [("rtc_happy", ALICE, "main", 0, f'["{fc_id}"]')])
    await eventually(lambda: call.outputs())
    await eventually(lambda: live_rows(state_dir) == [("rtc_happy", ALICE, "main", 0, "[]")])  # delivered
    await call.caller_hangs_up()
    await eventually(lambda: live_rows(state_dir) == [])
    with sqlite3.connect(f"{state_dir}/voicebridge.db") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
        assert db.execute("SELECT call_id FROM seen_calls").fetchall() == [("rtc_happy",)]


async def test_a_store_that_cannot_write_is_logged_once_and_calls_go_on(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture
) -> None:
    store = bridge.app[voicebridge.STORE]
    await asyncio.wrap_future(store._thread.submit(lambda: store._db.execute("PRAGMA query_only = 1")))  # "disk full"
    for call_id in ("rtc_one", "rtc_two"):
        call = await connected_call(bridge, openai, call_id)
        await call.model_response([("ask_openclaw", '{"request": "still working?"}')])
        await eventually(lambda: call.outputs())
        assert call.outputs()[0]["output"] == "Answer to: still working?"
        await call.caller_hangs_up()
    await eventually(lambda: calls_over(bridge))
    [error] = errors_logged(caplog)
    assert "state not saved to" in error.getMessage() and "readonly" in error.getMessage()


async def test_a_slow_disk_delays_neither_the_webhook_nor_a_tool_round(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_write = voicebridge.StateStore._write

    def sd_card(self: voicebridge.StateStore, *args: Any) -> None:
        time.sleep(0.5)  # every write, in the store's own thread
        slow_write(self, *args)

    monkeypatch.setattr(voicebridge.StateStore, "_write", sd_card)
    started = time.monotonic()
    call = await connected_call(bridge, openai)  # 2 writes queued already: the call, and its id for deduplication
    assert time.monotonic() - started < 0.5
    asked = time.monotonic()
    await call.model_response([("ask_openclaw", '{"request": "quick"}')])  # and one more for the question
    await eventually(lambda: call.outputs())
    assert time.monotonic() - asked < 0.5  # the round did not wait for the 1.5 s of writes still queued


# --- Holding under attack: the PIN lock over live calls, silent callers, the order of the last words ------------


async def test_a_lock_that_engages_hangs_up_every_call_still_waiting_for_its_pin(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(voicebridge, "PIN_LOCK_AFTER", 3)  # one caller's three wrong PINs lock the line
    bridge = await start_bridge(CALL_PIN="246813", MAX_CONCURRENT_CALLS="0")
    owner = await connected_call(bridge, openai, "rtc_owner")
    await owner.press("246813")
    await eventually(lambda: owner.notes() == [voicebridge.PIN_ACCEPTED])
    waiting = await connected_call(bridge, openai, "rtc_waiting")  # the attacker's second line, biding its time
    dialler = await connected_call(bridge, openai, "rtc_dialler")
    for attempt in range(3):
        await dialler.wait_idle()
        await dialler.press(f"{attempt}00000")
        await eventually(lambda: caplog.text.count("wrong PIN (") == attempt + 1)
    await eventually(lambda: "across calls: new calls are turned away until" in caplog.text)
    await waiting.press("246813")  # the right guess, typed on a line that is already in: too late, it is locked
    await eventually(lambda: waiting.state == "ended", timeout=5)
    assert voicebridge.PIN_ACCEPTED not in waiting.notes()
    assert any(voicebridge.PIN_LOCKED_GOODBYE in str(e.get("response")) for e in waiting.response_creates())
    await eventually(lambda: "[rtc_waiting] call summary" in caplog.text)
    assert "reason=pin_locked" in caplog.text and openclaw.requests == []
    assert owner.state == "accepted"  # who typed the PIN before the lock stays on
    await owner.model_response([("ask_openclaw", '{"request": "still working?"}')])
    await eventually(lambda: owner.outputs())


async def test_the_wrong_pin_that_locks_the_line_gets_the_goodbye_not_try_again(
    start_bridge: Bridge, openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(voicebridge, "PIN_LOCK_AFTER", 1)  # this call's first wrong PIN locks the line
    bridge = await start_bridge(CALL_PIN="246813")
    call = await connected_call(bridge, openai)
    await call.press("111111")
    await eventually(lambda: call.state == "ended", timeout=5)
    assert voicebridge.PIN_WRONG not in call.notes()  # no "type it again" before "too many wrong PINs, goodbye"
    assert any(voicebridge.PIN_LOCKED_GOODBYE in str(e.get("response")) for e in call.response_creates())


@pytest.mark.parametrize("how", ["PIN timeout", "hangs up after the prompt"])
async def test_silent_callers_count_toward_the_lock(
    start_bridge: Bridge, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    monkeypatch.setattr(voicebridge, "PIN_LOCK_AFTER", 3)
    bridge = await start_bridge(CALL_PIN="246813", pin_timeout=0.3)
    for n in range(3):  # three silent calls: they type nothing at all
        call = await connected_call(bridge, openai, f"rtc_silent_{n}")
        if how == "hangs up after the prompt":
            await call.caller_hangs_up()
        await eventually(lambda: calls_over(bridge), timeout=3)
    await eventually(lambda: "across calls: new calls are turned away until" in caplog.text)
    nth = openai.ring("rtc_silent_3")
    await post_webhook(bridge, incoming_event("rtc_silent_3"))
    await eventually(lambda: nth.state == "rejected")
    assert nth.reject_body == {"status_code": 603} and caplog.text.count("counts as a wrong PIN") == 3


async def test_end_call_in_the_same_response_as_a_question_lets_the_answer_be_heard(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    call = await connected_call(bridge, openai)
    call.speak_seconds = 0.3  # the answer takes a while to say
    # "Text Sam I'm running late. That's all, bye."
    [fc_id, _] = await call.model_response([("ask_openclaw", '{"request": "text Sam I am late"}'), ("end_call", "{}")])
    await eventually(lambda: call.state == "ended", timeout=5)
    assert call.outputs() == [{"type": "function_call_output", "call_id": fc_id, "output": "Answer to: text Sam I am late"}]
    answer = [e for e in call.response_creates() if "response" not in e][-1]
    heard = [e["_at"] for e in call.sent if e["type"] == "output_audio_buffer.stopped"][-1]
    assert call.hangup_at is not None and call.hangup_at >= heard > answer["_at"] + 0.25


async def test_no_filler_after_a_goodbye(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(voicebridge, "FILLER_AFTER", 0.2)
    call = await connected_call(bridge, openai)
    call_obj = bridge.app[voicebridge.CALLS]["rtc_happy"]
    call.audio_tail = 0.5  # the goodbye is still being heard after its response.done
    openclaw.delay = 2.0
    await call.model_response([("ask_openclaw", '{"request": "slow one"}')])
    await eventually(lambda: openclaw.requests)
    speaking = asyncio.create_task(call.model_response(audio_seconds=0.3))  # the model talks while the filler is due
    await eventually(lambda: call.response_active)
    bye = asyncio.create_task(call_obj.hang_up_after_goodbye("shutdown", goodbye=voicebridge.SHUTDOWN_GOODBYE))
    await bye
    try:
        await speaking
    except ConnectionError:  # the rest of the model's audio would have gone to a call that is over
        pass
    await eventually(lambda: call.state == "ended")
    kinds = [(e.get("response") or {}).get("instructions") for e in call.response_creates()]
    assert kinds[-1] == voicebridge.SHUTDOWN_GOODBYE and voicebridge.FILLER_INSTRUCTIONS not in kinds


async def test_an_item_refused_as_a_duplicate_is_settled_and_never_sent_again(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    call = await connected_call(bridge, openai)
    call_obj = bridge.app[voicebridge.CALLS]["rtc_happy"]
    await call.model_response([("ask_openclaw", '{"request": "one"}')])
    await eventually(lambda: call.outputs())
    await call.wait_idle()
    [sent] = [e["item"] for e in call.received if e["type"] == "conversation.item.create"]
    call_obj.sideband.unconfirmed[sent["id"]] = dict(sent)  # as if conversation.item.added had not come back
    await call.drop(1006)
    await eventually(lambda: call.errors)  # resent once, and refused: "already exists" is its confirmation
    await call.wait_idle()
    await call.drop(1006)  # a later reconnect in the same call
    await eventually(lambda: len(call.sideband_attempts) == 3 and call.ws is not None)
    await asyncio.sleep(0.2)
    creates = [e for e in call.received if e["type"] == "conversation.item.create" and e["item"]["id"] == sent["id"]]
    assert len(creates) == 2 and len(call.errors) == 1 and sent["id"] not in call_obj.sideband.unconfirmed


async def test_nested_json_and_forged_lines_from_the_sideband_change_nothing(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture
) -> None:
    call = await connected_call(bridge, openai)
    assert call.ws is not None
    await call.ws.send_str('{"type": "x", "a": ' + "[" * 100_000 + "]" * 100_000 + "}")  # RecursionError, not a crash
    await call.send({"type": "error", "error": {"type": "invalid_request_error", "code": "bad\n[rtc_happy] PIN accepted",
                                                "message": "boom\n[rtc_happy] OpenClaw answered in 0.1s"}})
    forged = "ask_openclaw\n[rtc_happy] PIN accepted"
    await call.model_response([(forged, "{}"), ("ask_openclaw", '{"request": ' + "[" * 2000 + "]" * 2000 + "}")])
    await eventually(lambda: len(call.outputs()) == 2)
    assert [o["output"][:6] for o in call.outputs()] == ["Error:"] * 2  # an unknown tool, and arguments too deep
    [fc_id] = await call.model_response([("ask_openclaw", '{"request": "still alive?"}')])
    await eventually(lambda: len(call.outputs()) == 3)
    assert call.outputs()[-1]["output"] == "Answer to: still alive?" and call.state == "accepted"
    ours = [r.getMessage() for r in caplog.records if r.name == "voicebridge"]
    assert not [line for line in ours if "\n" in line] and not errors_logged(caplog)


async def test_a_call_the_lock_catches_while_its_accept_is_out_is_hung_up_not_greeted(
    start_bridge: Bridge, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(voicebridge, "PIN_LOCK_AFTER", 3)
    bridge = await start_bridge(CALL_PIN="246813", MAX_CONCURRENT_CALLS="0")
    dialler = await connected_call(bridge, openai, "rtc_dialler")
    for attempt in range(2):
        await dialler.wait_idle()
        await dialler.press(f"{attempt}00000")
        await eventually(lambda: caplog.text.count("wrong PIN (") == attempt + 1)
    late = openai.ring("rtc_late")
    late.accept_delay = 0.5  # OpenAI takes its time with this accept ...
    await post_webhook(bridge, incoming_event("rtc_late"))
    await eventually(lambda: ("accept", "rtc_late") in openai.rest)
    await dialler.wait_idle()
    await dialler.press("200000")  # ... and meanwhile the third wrong PIN locks the line
    await eventually(lambda: late.state == "ended", timeout=5)
    assert late.response_creates() == [] and late.sideband_attempts == []  # never greeted, never attached
    assert openai.rest.count(("hangup", "rtc_late")) == 1
    await eventually(lambda: "[rtc_late] call summary" in caplog.text)
    assert "[rtc_late] call summary" in caplog.text and "reason=pin_locked" in caplog.text


async def test_an_owed_goodbye_survives_a_refused_filler_and_a_refused_idle_check_is_not_repeated() -> None:
    rules, wire = voicebridge.Sideband(voicebridge.CallLog("rtc_rules")), Recorder()
    await rules.attach(wire, again=False)  # type: ignore[arg-type]
    refused: dict[str, Any] = {"code": "conversation_already_has_active_response"}
    await rules.request_response({"instructions": "still checking", "tool_choice": "none"})
    goodbye = {"instructions": "goodbye", "tool_choice": "none", "metadata": voicebridge.GOODBYE_TAG}
    await rules.owe(goodbye)  # the filler is active: the goodbye waits for its response.done
    await rules.on_event("error", {"error": {**refused, "event_id": wire.sent[-1]["event_id"]}})  # the caller spoke
    await rules.on_event("response.done", {})
    assert [e.get("response") for e in wire.sent] == [{"instructions": "still checking", "tool_choice": "none"},
                                                        goodbye]  # the goodbye, not "still checking" again
    await rules.on_event("response.done", {})
    check = {"instructions": voicebridge.IDLE_CHECK, "tool_choice": "none", "metadata": voicebridge.IDLE_TAG}
    await rules.request_response(check)
    await rules.on_event("error", {"error": {**refused, "event_id": wire.sent[-1]["event_id"]}})
    await rules.on_event("response.done", {})  # the caller was there after all: "anyone there?" would be stale
    assert len(wire.sent) == 3 and not rules.response_active


async def test_audio_cut_off_by_a_drop_does_not_hold_the_silence_clock(
    start_bridge: Bridge, openai: FakeOpenAI
) -> None:
    bridge = await start_bridge(idle_seconds=0.5)
    call = await connected_call(bridge, openai)
    await call.send({"type": "output_audio_buffer.started", "response_id": "resp_cut"})  # speech, then the drop:
    await call.drop(1006)  # its output_audio_buffer.stopped will never come
    await eventually(lambda: call.ws is not None)
    await eventually(lambda: idle_checks(call), timeout=3)


async def test_no_question_goes_to_openclaw_once_the_call_is_ending(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    call = await connected_call(bridge, openai)
    call_obj = bridge.app[voicebridge.CALLS]["rtc_happy"]
    call.audio_tail = 0.3
    bye = asyncio.create_task(call_obj.hang_up_after_goodbye("shutdown", goodbye=voicebridge.SHUTDOWN_GOODBYE))
    await eventually(lambda: len(call.response_creates()) == 2)
    await call.wait_idle()  # the goodbye is still being heard when a question arrives
    [fc_id] = await call.model_response([("ask_openclaw", '{"request": "send that email"}')])
    await eventually(lambda: call.outputs() or call.state == "ended")
    await bye
    assert openclaw.requests == []
    assert call.outputs() in ([], [{"type": "function_call_output", "call_id": fc_id, "output": "Not sent: the call is ending."}])


# --- Health, configuration, the process --------------------------------------------------------------------------------


async def test_healthz(bridge: Any) -> None:
    resp = await bridge.get("/healthz")
    assert resp.status == 200 and await resp.json() == {
        "status": "ok", "active_calls": 0, "max_concurrent_calls": 3, "pin_locked_until": None}


def test_config_errors_name_the_variable() -> None:
    good = {"OPENAI_API_KEY": "sk-x", "OPENAI_WEBHOOK_SECRET": SECRET}
    assert config_from(good).allowed_callers == {}
    cases = {
        "OPENAI_API_KEY": {"OPENAI_WEBHOOK_SECRET": SECRET},
        "OPENAI_WEBHOOK_SECRET is not set": {"OPENAI_API_KEY": "sk-x"},
        "must start with 'whsec_'": {**good, "OPENAI_WEBHOOK_SECRET": "abc"},
        "not valid base64": {**good, "OPENAI_WEBHOOK_SECRET": "whsec_%%%"},
        "ALLOWED_CALLERS": {**good, "ALLOWED_CALLERS": "+15551234567, 555-1234"},
        "OPENCLAW_TIMEOUT": {**good, "OPENCLAW_TIMEOUT": "soon"},
        "PORT": {**good, "PORT": "http"},
        "LOG_LEVEL": {**good, "LOG_LEVEL": "loud"},
    }
    for message, env in cases.items():
        with pytest.raises(ConfigError, match=message):
            config_from(env)
    config = config_from({**good, "ALLOWED_CALLERS": " +1 555 123 4567 ,*", "OPENAI_BASE_URL": "http://127.0.0.1:1/v1/"})
    assert config.allowed_callers == {"+15551234567": "main", "*": "main"}
    assert voicebridge.sideband_url(config, "rtc_1") == "ws://127.0.0.1:1/v1/realtime?call_id=rtc_1"
    assert voicebridge.sideband_url(config_from(good), "rtc_1") == "wss://api.openai.com/v1/realtime?call_id=rtc_1"


def test_startup_fails_fast_naming_the_missing_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OPENCLAW_"))}
    env["OPENAI_API_KEY"] = ""  # set, so that a developer's own .env cannot fill it in
    result = subprocess.run([sys.executable, str(HERE / "voicebridge.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "OPENAI_API_KEY is not set" in result.stderr and "Traceback" not in result.stderr


# --- The real process: SIGTERM, --check, --ask ------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def run_voicebridge(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    """Start `python voicebridge.py ARGS` with exactly these settings (a developer's .env cannot add to them)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OPENCLAW_"))}
    return await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "voicebridge.py"), *args, env={**base, "LOG_LEVEL": "INFO", **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )


async def output_of(proc: asyncio.subprocess.Process, timeout: float = 30) -> tuple[int, str]:
    stdout, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode()


async def test_sigterm_drains_live_calls_then_exits_0(openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    port = free_port()
    proc = await run_voicebridge({**make_env(openai, openclaw), "PORT": str(port), "SHUTDOWN_GRACE": "1.5"})
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def health() -> tuple[int, dict[str, Any]]:
                try:
                    async with http.get(f"{base}/healthz") as resp:
                        return resp.status, await resp.json()
                except aiohttp.ClientConnectionError:
                    return 0, {}

            deadline = time.monotonic() + 20
            while (await health())[0] != 200:
                assert time.monotonic() < deadline and proc.returncode is None, "voicebridge did not start"
                await asyncio.sleep(0.05)

            live = openai.ring("rtc_live")
            body = incoming_event("rtc_live")
            async with http.post(f"{base}/webhook", data=body, headers=sign(body)) as resp:
                assert resp.status == 200
            await eventually(lambda: live.ws is not None and live.response_creates())
            await live.wait_idle()

            proc.send_signal(signal.SIGTERM)
            sigterm_at = time.monotonic()
            for _ in range(100):
                status, payload = await health()
                if status == 503:
                    break
                await asyncio.sleep(0.02)
            assert (status, payload["status"], payload["active_calls"]) == (503, "draining", 1)

            # A new call while draining is turned away at once, not left ringing.
            late = openai.ring("rtc_late")
            body = incoming_event("rtc_late")
            async with http.post(f"{base}/webhook", data=body, headers=sign(body)) as resp:
                assert resp.status == 200
            await eventually(lambda: late.state == "rejected")
            assert late.reject_body == {"status_code": 486}

            # The live call goes on through the grace period: a question still gets answered.
            await live.model_response([("ask_openclaw", '{"request": "quick one"}')])
            await eventually(lambda: live.outputs())
            assert live.state == "accepted"

            code, output = await output_of(proc, timeout=15)
        assert code == 0, output
        assert 1.5 <= live.hangup_at - sigterm_at < 8  # type: ignore[operator]
        goodbye = [e for e in live.response_creates() if "goodbye" in str(e.get("response"))]
        assert len(goodbye) == 1 and goodbye[0]["_at"] < live.hangup_at  # type: ignore[operator]
        assert "reason=shutdown" in output and "Traceback" not in output and API_KEY not in output
        assert live.errors == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigterm_with_a_slow_body_in_flight_exits_in_time_quietly(
    openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    port = free_port()
    proc = await run_voicebridge({**make_env(openai, openclaw), "PORT": str(port), "SHUTDOWN_GRACE": "0"})
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(400):
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.05)
        _, gone = await asyncio.open_connection("127.0.0.1", port)  # a client that goes away mid-body: routine
        gone.write(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"type\": ")
        await gone.drain()
        await asyncio.sleep(0.2)
        gone.transport.abort()
        _, writer, trickle = await open_trickle("127.0.0.1", port)
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code, output = await output_of(proc, timeout=15)  # the deadline is SHUTDOWN_GRACE + 20 = 20 s
        trickle.cancel()
        writer.close()
        assert code == 0 and time.monotonic() - started < 10, output
        assert "stopped" in output and "Traceback" not in output
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_ctrl_c_with_no_calls_exits_at_once(openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    port = free_port()
    proc = await run_voicebridge({**make_env(openai, openclaw), "PORT": str(port), "SHUTDOWN_GRACE": "30"})
    async with aiohttp.ClientSession() as http:
        for _ in range(400):
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code, output = await output_of(proc, timeout=10)
    assert code == 0 and time.monotonic() - started < 5, output
    assert "voicebridge listening on" in output and "KeyboardInterrupt" not in output


def test_banner_masks_secrets_and_warns_about_open_policies(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="voicebridge")
    env = {"OPENAI_API_KEY": API_KEY, "OPENAI_WEBHOOK_SECRET": SECRET, "OPENCLAW_TOKEN": CLAW_TOKEN}
    voicebridge.log_banner(config_from({**env, "ALLOWED_CALLERS": ALICE}))
    assert "+1******4567" in caplog.text and "model gpt-realtime-2.1, voice marin" in caplog.text
    assert API_KEY not in caplog.text and CLAW_TOKEN not in caplog.text and ALICE not in caplog.text
    assert "WARNING" not in caplog.text
    for callers, warning in (("", "EVERY CALL WILL BE REJECTED"), ("*", "ANYONE WHO DIALS")):
        caplog.clear()
        voicebridge.log_banner(config_from({**env, "ALLOWED_CALLERS": callers}))
        assert warning in caplog.text


@pytest.mark.parametrize(
    "broken,fix",
    [
        ({}, None),
        ({"OPENAI_API_KEY": "sk-wrong"}, "HTTP 401: Incorrect API key provided. (OpenAI refused OPENAI_API_KEY"),
        ({"REALTIME_MODEL": "gpt-realtime-9"}, "(REALTIME_MODEL=gpt-realtime-9 is not available to this key's project"),
        ({"OPENCLAW_TOKEN": "wrong"}, "check OPENCLAW_TOKEN"),
        ({"mode": "disabled"}, "HTTP 404: Not Found (enable gateway.http.endpoints.chatCompletions"),
        ({"OPENCLAW_AGENT": "nobody"}, "Unknown agent 'nobody'. (check OPENCLAW_AGENT)"),
        ({"OPENCLAW_URL": "http://127.0.0.1:9"}, "cannot connect to 127.0.0.1:9 (OPENCLAW_URL): connection refused"),
        ({"OPENAI_WEBHOOK_SECRET": "not-a-secret"}, "FAIL  configuration complete, OPENAI_WEBHOOK_SECRET well formed\n"
                                                    "      OPENAI_WEBHOOK_SECRET must start with 'whsec_'"),
    ],
)
async def test_check_probes_both_sides_without_making_a_call(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, broken: dict[str, str], fix: str | None
) -> None:
    openclaw.mode = broken.pop("mode", "ok")
    code, output = await output_of(await run_voicebridge({**make_env(openai, openclaw), **broken}, "--check"))
    if fix is None:
        assert code == 0 and "All good" in output and "FAIL" not in output, output
    else:
        assert code == (78 if "OPENAI_WEBHOOK_SECRET" in broken else 1) and fix in output and "FAIL" in output, output
    assert openai.rest == [] and openclaw.requests == []  # no call, no agent run
    assert openai.models_retrieved == [broken.get("REALTIME_MODEL", "gpt-realtime-2.1")]  # probed in every case
    assert API_KEY not in output and CLAW_TOKEN not in output


async def test_ask_runs_the_question_as_a_call_would(openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    env = {k: v for k, v in make_env(openai, openclaw).items() if not k.startswith("OPENAI_")}  # no OpenAI needed
    code, output = await output_of(await run_voicebridge(env, "--ask", "What is on my calendar tomorrow?"))
    assert code == 0, output
    assert "The caller would hear: Answer to: What is on my calendar tomorrow?" in output and "s)" in output
    [request] = openclaw.requests
    assert request["model"] == "openclaw:main" and request["messages"][0]["content"] == voicebridge.OPENCLAW_SYSTEM_PROMPT

    code, output = await output_of(await run_voicebridge({**env, "OPENCLAW_TOKEN": "wrong"}, "--ask", "hello?"))
    assert code == 1
    assert f"The caller would hear: {voicebridge.SAY_UNREACHABLE}" in output and "check OPENCLAW_TOKEN" in output


async def test_a_password_in_a_url_is_never_shown(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture
) -> None:
    host = openclaw.url.removeprefix("http://")
    env = make_env(openai, openclaw, OPENCLAW_URL=f"http://user:secret@{host}", OPENCLAW_TOKEN="")
    voicebridge.log_banner(config_from({**env, "OPENAI_BASE_URL": openai.url.replace("//", "//sk:secret@")}))
    assert f"OpenClaw   http://{host}  token NOT SET" in caplog.text and "secret" not in caplog.text
    assert f"OpenAI     {openai.url}  key set" in caplog.text
    code, output = await output_of(await run_voicebridge(env, "--check"))  # the fake wants a token: 401
    assert code == 1 and f"FAIL  OpenClaw at http://{host}: reachable" in output and "secret" not in output, output
    env["OPENCLAW_URL"] = "http://user:secret@127.0.0.1:9"
    code, output = await output_of(await run_voicebridge(env, "--ask", "hello?"))
    assert code == 1 and "problem: cannot reach http://127.0.0.1:9 (" in output and "secret" not in output, output
    assert voicebridge.one_line("https://u:p@ss@example.com:8443/v1?x=@") == "https://example.com:8443/v1?x=@"
    assert voicebridge.one_line("http://127.0.0.1:18789") == "http://127.0.0.1:18789"


async def test_check_probes_every_agent_and_names_the_entry_of_a_missing_one(openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    openclaw.agents = {"main", "family"}
    env = make_env(openai, openclaw, ALLOWED_CALLERS=f"{ALICE},{BOB}=family,*=guest")
    code, output = await output_of(await run_voicebridge(env, "--check"))
    assert code == 1, output
    url = openclaw.url
    assert f"ok    OpenClaw at {url}: reachable, token accepted, chat endpoint enabled, agent 'main' exists" in output
    assert f"ok    OpenClaw at {url}: reachable, token accepted, chat endpoint enabled, agent 'family' exists" in output
    assert (f"FAIL  OpenClaw at {url}: reachable, token accepted, chat endpoint enabled, agent 'guest' exists\n"
            "      HTTP 400: Unknown agent 'guest'. (check the ALLOWED_CALLERS entry *=guest, or add the agent to "
            "OpenClaw's agents.entries)") in output
    assert "1 problem(s) found." in output and openclaw.requests == []  # three probes, no agent run
    openclaw.agents.add("guest")
    code, output = await output_of(await run_voicebridge(env, "--check"))
    assert code == 0 and "All good" in output, output


async def test_ask_as_a_caller_uses_their_agent_and_session(openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    openclaw.agents = {"main", "family"}
    env = {k: v for k, v in make_env(openai, openclaw, ALLOWED_CALLERS=f"{ALICE},{BOB}=family").items()
           if not k.startswith("OPENAI_")}
    code, output = await output_of(await run_voicebridge(env, "--ask", "Any messages for me?", "--caller", "+1 555 765 4321"))
    assert code == 0 and "The caller would hear: Answer to: Any messages for me?" in output and "(agent family, " in output
    [request] = openclaw.requests
    assert request["model"] == "openclaw:family" and request["user"] == f"voicebridge:{BOB}"
    assert request["messages"][0]["content"] == voicebridge.openclaw_system(BOB) and BOB in voicebridge.openclaw_system(BOB)
    for caller, problem in (("+15559999999", "--caller +15559999999: ALLOWED_CALLERS turns this caller away"),
                            ("bob", "--caller bob: not an E.164 number like +15551234567")):
        code, output = await output_of(await run_voicebridge(env, "--ask", "hello?", "--caller", caller))
        assert code == 1 and problem in output, output
    code, output = await output_of(await run_voicebridge(env, "--caller", BOB))
    assert code == 2 and "--caller goes with --ask" in output
    assert len(openclaw.requests) == 1


# --- Load: many calls at once ---------------------------------------------------------------------------------


async def test_100_concurrent_calls_3_questions_each_no_crossing_no_leaks(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    bridge = await start_bridge(MAX_CONCURRENT_CALLS="0")  # no cap: this is a load test
    openclaw.delay = 0.01
    call_ids = [f"rtc_load_{i:03d}" for i in range(100)]
    calls = await asyncio.gather(*(connected_call(bridge, openai, call_id) for call_id in call_ids))
    assert await active_calls(bridge) == 100

    async def three_questions(call: FakeCall) -> None:
        for n in range(3):
            await call.model_response([("ask_openclaw", json.dumps({"request": f"{call.id} question {n}"}))])
            await eventually(lambda: len(call.outputs()) == n + 1, timeout=20)
            await call.wait_idle()

    await asyncio.gather(*(three_questions(call) for call in calls))
    for call in calls:
        assert [o["output"] for o in call.outputs()] == [f"Answer to: {call.id} question {n}" for n in range(3)]
        assert call.errors == []
    assert len(openclaw.requests) == 300
    assert all(r["user"] == f"voicebridge:{ALICE}" for r in openclaw.requests)

    await asyncio.gather(*(call.caller_hangs_up() for call in calls))
    await eventually(lambda: not bridge.app[voicebridge.CALLS], timeout=20)
    assert await active_calls(bridge) == 0
    await eventually(lambda: not bridge.app[voicebridge.TASKS])
    assert not [t for t in asyncio.all_tasks() if "Call." in repr(t.get_coro())]
    assert not bridge.app[voicebridge.HTTP].connector._acquired  # no sideband or request left open


# --- Hostile input: property-based ---------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=120)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


class Stack:
    """Fake OpenAI, fake OpenClaw and voicebridge on real sockets, run by a loop on a background thread.

    Hypothesis drives synchronous tests; each example hands its coroutine to this loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.openai, self.openclaw = FakeOpenAI(), FakeOpenClaw()
        self.runners: list[web.AppRunner] = []

    def run(self, coro: Awaitable[Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    async def serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def start(self) -> None:
        self.openai.url = await self.serve(self.openai.app) + "/v1"
        self.openclaw.url = await self.serve(self.openclaw.app)
        self.app = make_app(config_from(make_env(self.openai, self.openclaw)))
        self.url = await self.serve(self.app)
        self.http = aiohttp.ClientSession()

    async def post(self, body: bytes, headers: dict[str, str]) -> int:
        async with self.http.post(f"{self.url}/webhook", data=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    async def healthy(self) -> bool:
        async with self.http.get(f"{self.url}/healthz") as resp:
            return resp.status == 200

    async def stop(self) -> None:
        await self.http.close()
        for runner in reversed(self.runners):
            await runner.cleanup()


@pytest.fixture(scope="module")
def stack() -> Any:
    stack = Stack()
    stack.run(stack.start())
    yield stack
    stack.run(stack.stop())
    stack.loop.call_soon_threadsafe(stack.loop.stop)
    stack.thread.join(5)


@PROPERTY
@given(body=st.binary(max_size=2000), headers=st.dictionaries(
    st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "x-other"]), header_text))
def test_signature_check_never_raises_anything_but_a_clear_no(body: bytes, headers: dict[str, str]) -> None:
    with pytest.raises(voicebridge.SignatureError):
        verify_signature(voicebridge.parse_webhook_secret(SECRET)[0], headers, body)


@PROPERTY
@given(body=st.binary(min_size=1, max_size=500), position=st.integers(min_value=0), flip=st.integers(1, 255),
       field=st.sampled_from(["body", "webhook-id", "webhook-timestamp", "webhook-signature"]))
def test_any_change_to_a_signed_delivery_breaks_the_signature(body: bytes, position: int, flip: int, field: str) -> None:
    key = voicebridge.parse_webhook_secret(SECRET)[0]
    headers = sign(body)
    verify_signature(key, headers, body)
    if field == "body":
        mutated = bytearray(body)
        mutated[position % len(body)] ^= flip
        body = bytes(mutated)
    else:
        value = headers[field]
        index = position % len(value)
        headers = {**headers, field: value[:index] + chr((ord(value[index]) + flip) % 95 + 32) + value[index + 1:]}
        if headers[field] == value:
            return
    with pytest.raises(voicebridge.SignatureError):
        verify_signature(key, headers, body)


@PROPERTY
@given(value=st.text(max_size=200) | st.from_regex(r'("[^"]{0,20}" )?<(sip|sips|tel):\+?[0-9]{0,16}(@[a-z.]{0,20})?(;[a-z=]{0,10})?>(;tag=[a-z0-9]{0,8})?'))
def test_from_parser_never_raises_and_only_returns_e164(value: str) -> None:
    number = caller_number([{"name": "From", "value": value}])
    assert number is None or re.fullmatch(r"\+[1-9]\d{6,14}", number)


@PROPERTY
@given(sip_headers=json_values)
def test_from_parser_takes_any_shape_of_sip_headers(sip_headers: Any) -> None:
    number = caller_number(sip_headers)
    assert number is None or re.fullmatch(r"\+[1-9]\d{6,14}", number)


@PROPERTY
@given(body=st.binary(max_size=3000), headers=st.dictionaries(
    st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "content-type"]), header_text))
def test_webhook_without_a_valid_signature_is_400_and_calls_nobody(stack: Stack, body: bytes, headers: dict[str, str]) -> None:
    assert stack.run(stack.post(body, headers)) == 400
    assert stack.openai.rest == []


@PROPERTY
@given(event=json_values | st.fixed_dictionaries(
    {"type": st.sampled_from(["realtime.call.incoming", "response.completed", "batch.completed"])},
    optional={"data": json_values | st.fixed_dictionaries({"call_id": json_values | st.text(max_size=30)},
                                                           optional={"sip_headers": json_values})}))
def test_signed_webhooks_of_any_shape_never_5xx(stack: Stack, event: Any) -> None:
    body = json.dumps(event).encode()
    assert stack.run(stack.post(body, sign(body))) in (200, 400)
    assert stack.run(stack.healthy())


def test_after_the_storm_the_server_is_healthy(stack: Stack) -> None:
    assert stack.run(stack.healthy())
    assert all(action in ("accept", "reject") for action, _ in stack.openai.rest)  # only signed calls got REST


junk_event = st.one_of(
    st.text(max_size=200).map(lambda text: ("text", text)),
    st.binary(max_size=200).map(lambda data: ("binary", data)),
    json_values.map(lambda value: ("json", value)),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["response.created", "response.done", "error", "output_audio_buffer.started",
                                  "output_audio_buffer.stopped", "response.function_call_arguments.done",
                                  "input_audio_buffer.dtmf_event_received", "session.updated", "whatever"])},
        optional={"response": json_values | st.fixed_dictionaries({
            "status": st.sampled_from(["completed", "cancelled", "failed", "incomplete"]) | json_values,
            "output": st.lists(st.fixed_dictionaries({"type": st.just("function_call")}, optional={
                "name": st.sampled_from(["ask_openclaw", "nope"]) | json_values, "call_id": json_values | st.text(max_size=8),
                "arguments": json_values | st.text(max_size=50) | st.just('{"request": "' + "x" * 100_000 + '"}'),
            }), max_size=3) | json_values}),
            "error": json_values, "event": json_values, "name": json_values},
    ).map(lambda value: ("json", value)),
)


@settings(max_examples=60, deadline=None)
@given(junk=st.lists(junk_event, max_size=12))
def test_junk_on_the_sideband_never_kills_the_call(stack: Stack, junk: list[tuple[str, Any]]) -> None:
    async def scenario() -> None:
        call_id = f"rtc_junk_{os.urandom(6).hex()}"
        call = stack.openai.ring(call_id)
        body = incoming_event(call_id)
        assert await stack.post(body, sign(body)) == 200
        await eventually(lambda: call.ws is not None and call.response_creates())
        await call.wait_idle()
        for kind, value in junk:
            assert call.ws is not None
            if kind == "text":
                await call.ws.send_str(value)
            elif kind == "binary":
                await call.ws.send_bytes(value)
            else:
                await call.ws.send_json(value)
        bridge_call = stack.app[voicebridge.CALLS][call_id]
        await eventually(lambda: not bridge_call.asking)
        await asyncio.sleep(0.02)
        assert bridge_call.task is not None and not bridge_call.task.done()
        [fc_id] = await call.model_response([("ask_openclaw", '{"request": "are you alive?"}')])
        await eventually(lambda: any(o["call_id"] == fc_id for o in call.outputs()))
        assert [o["output"] for o in call.outputs() if o["call_id"] == fc_id] == ["Answer to: are you alive?"]
        await call.caller_hangs_up()
        await eventually(lambda: call_id not in stack.app[voicebridge.CALLS])

    stack.run(scenario())


@pytest.mark.parametrize("header", [b"webhook-id: wh_\xff\xfe", b"webhook-signature: v1,\xc3\x28abc", b"webhook-id: wh_\xe2\x82\xac"])
async def test_raw_non_utf8_header_bytes_are_a_clear_400(bridge: Any, openai: FakeOpenAI, header: bytes) -> None:
    body = incoming_event("rtc_raw")
    headers = sign(body)
    name = header.split(b":")[0].decode()
    lines = [f"{k}: {v}".encode() for k, v in headers.items() if k != name] + [header]
    request = (b"POST /webhook HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"\r\n".join(lines)
               + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    reader, writer = await asyncio.open_connection(bridge.server.host, bridge.server.port)
    writer.write(request)
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"400", status_line
    assert openai.rest == []


# --- The keypad and the sideband's sending rules, driven directly (no event loop for the keypad, no socket for
# the rules: docs/protocol.md steps 5 and 6 are checked line by line against a recorder of what would be sent) -----------------


def test_the_keypad_accepts_the_pin_counts_wrong_ones_and_ignores_what_is_not_a_key() -> None:
    pad = voicebridge.Keypad("2468")
    assert [pad.press(key, 1.0) for key in "246"] == ["", "", ""] and not pad.ok
    for junk in ("A", None, 7, "12", "", "١"):  # not a key of a phone keypad: no strike, no state
        assert pad.press(junk, 1.1) == "" and pad.failures == 0
    assert pad.press("8", 1.2) == "accepted" and pad.ok and not pad.waiting
    assert pad.press("1", 1.3) == ""  # nothing more is checked once it is accepted

    pad = voicebridge.Keypad("2468")
    outcomes = [pad.press(key, 2.0) for key in "1111#*2222#3333"]
    assert [o for o in outcomes if o] == ["wrong", "wrong", "out of tries"] and pad.failures == 3
    assert not pad.waiting and pad.press("2", 2.0) == "" and [pad.press(k, 3.0) for k in "2468"] == [""] * 4

    pad = voicebridge.Keypad("2468")
    assert [pad.press(k, t) for k, t in [("2", 0.0), ("4", 1.0), ("6", 1.0 + voicebridge.PIN_IDLE + 0.1)]] == [""] * 3
    assert [pad.press(k, 9.0) for k in "468"] == ["", "", "wrong"]  # "6" began a new entry: "6468"
    assert voicebridge.Keypad("").ok and not voicebridge.Keypad("").waiting  # no PIN set: nothing to type


@given(pin=st.from_regex(r"\d{4,8}", fullmatch=True),
       presses=st.lists(st.tuples(st.sampled_from([*voicebridge.KEYPAD, "A", "", "00", None]),
                                  st.floats(0, 2 * voicebridge.PIN_IDLE)), max_size=60))
@PROPERTY
def test_no_sequence_of_keys_accepts_anything_but_the_pin(pin: str, presses: list[tuple[Any, float]]) -> None:
    pad, now, last, entry, strikes = voicebridge.Keypad(pin), 0.0, float("-inf"), "", 0
    for key, pause in presses:
        now += pause
        outcome = pad.press(key, now)
        if key not in voicebridge.KEYPAD:
            assert outcome == "" and pad.failures == strikes  # a stray key never costs a strike, nor resets anything
            continue
        if key in "*#" or now - last > voicebridge.PIN_IDLE:
            entry = ""  # what the caller typed since the last * or # or pause
        last, entry = now, entry + key.strip("*#")
        if len(entry) < len(pin):
            assert outcome == ""
            continue
        assert outcome == ("accepted" if entry == pin else "wrong" if strikes < 2 else "out of tries")
        if outcome == "accepted":
            break
        strikes, entry = strikes + 1, ""
        if strikes == 3:
            assert not pad.waiting and all(pad.press(k, now) == "" for k in pin)  # out of tries: the PIN is not taken
            break
    assert pad.failures == strikes and pad.ok == (outcome == "accepted" if presses else False)


def test_the_silence_clock_asks_once_then_hangs_up_and_waits_for_whoever_is_talking() -> None:
    clock = voicebridge.SilenceClock(idle=30.0, quiet_since=100.0)
    assert (clock.quiet_since + clock.idle) == 130.0 and clock.look(129.9, busy=False) == ""
    assert clock.look(130.0, busy=True) == "" and (clock.quiet_since + clock.idle) == 160.0  # a response or a question: the clock waits
    assert clock.look(160.0, busy=False) == "ask" and clock.asked and (clock.quiet_since + clock.idle) == 190.0
    clock.heard(170.0)  # the assistant's "anyone there?" ends: the silence counts from then
    assert clock.look(190.0, busy=False) == "" and clock.look(200.0, busy=False) == "hang up"
    clock.caller(201.0, speaking=True)  # a sign of the caller: no longer asked, and the clock waits while they speak
    assert not clock.asked and clock.look(231.0, busy=False) == "" and (clock.quiet_since + clock.idle) == 261.0
    clock.caller(240.0)  # their next sign ends the speech
    assert clock.look(270.0, busy=False) == "ask"


def test_a_calls_record_keeps_its_steps_questions_tokens_and_first_word() -> None:
    record = voicebridge.CallRecord(received=time.monotonic() - 1.0, resumed=False)
    record.greeting_id = "resp_hello"
    record.audio_started("resp_other")  # another response's audio is not the greeting's first word
    record.audio_started("resp_hello")
    record.add_usage(USAGE)
    record.add_usage({"input_tokens": True, "output_tokens": -5, "input_token_details": "junk"})  # never counted
    answered, cut_off = record.ask(), record.ask()
    answered["outcome"] = "answered"
    record.settle(answered)
    assert record.said("caller", "hello") == "caller said: hello"
    entry = record.close("rtc_rec", ALICE, "main", time.time() - 1.0, "end_call", pin=None)
    assert entry["first_word"] is not None and 1.0 <= entry["first_word"] < 2.0
    assert [step for _, step in entry["timeline"]][:3] == ["webhook arrived", "greeting audio started",
                                                           "question 1 sent to OpenClaw"]
    assert entry["timeline"][-1][1] == "ended: end_call" and entry["end_reason"] == "end_call"
    assert [q["outcome"] for q in entry["questions"]] == ["answered", "cancelled by the hangup"]
    assert all("seconds" in q and "asked" in q for q in entry["questions"]) and cut_off in entry["questions"]
    assert entry["tokens"] == {"input": 300, "input_text": 120, "input_audio": 180, "input_cached": 64,
                               "output": 80, "output_text": 20, "output_audio": 60}
    assert entry["transcript"] == ["caller said: hello"] and entry["caller"] == ALICE and not entry["resumed"]
    resumed = voicebridge.CallRecord(received=time.monotonic(), resumed=True)
    assert resumed.timeline == "" and resumed.close("rtc_r", None, "main", time.time(), "idle", None)["resumed"]


class Recorder:
    """Stands in for the sideband's WebSocket: records what the sending rules put on the wire."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed = False

    async def send_json(self, event: dict[str, Any]) -> None:
        self.sent.append(event)

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.sent]


async def test_the_sending_rules_never_send_a_response_create_while_a_response_is_active() -> None:
    rules, wire = voicebridge.Sideband(voicebridge.CallLog("rtc_rules")), Recorder()
    await rules.attach(wire, again=False)  # type: ignore[arg-type]
    await rules.request_response({"instructions": "greet"})
    await rules.queue({"type": "function_call_output", "call_id": "call_1", "output": "one"})
    await rules.on_event("response.created", {})
    await rules.queue({"type": "function_call_output", "call_id": "call_2", "output": "two"})
    assert wire.kinds() == ["response.create"]  # the results wait for the active response
    await rules.on_event("response.done", {})
    assert wire.kinds() == ["response.create", "conversation.item.create", "conversation.item.create", "response.create"]
    assert [e["item"]["output"] for e in wire.sent[1:3]] == ["one", "two"] and "response" not in wire.sent[-1]
    await rules.queue({"type": "function_call_output", "call_id": "call_3", "output": "three"})
    assert len(wire.sent) == 4  # our own response.create is active until its response.done
    ids = [e["event_id"] for e in wire.sent]
    assert len(set(ids)) == len(ids)  # every client event has its own id, so an error can point back at it


async def test_a_refused_response_create_is_repeated_once_after_response_done_and_a_greeting_never() -> None:
    rules, wire = voicebridge.Sideband(voicebridge.CallLog("rtc_rules")), Recorder()
    await rules.attach(wire, again=False)  # type: ignore[arg-type]
    refused: dict[str, Any] = {"code": "conversation_already_has_active_response"}
    await rules.request_response({"instructions": "filler", "tool_choice": "none"})
    await rules.on_event("error", {"error": {**refused, "event_id": wire.sent[-1]["event_id"]}})
    assert rules.response_active and len(wire.sent) == 1  # the server's own response is under way
    await rules.on_event("response.done", {})
    assert [e["response"] for e in wire.sent] == [{"instructions": "filler", "tool_choice": "none"}] * 2
    await rules.on_event("response.done", {})
    await rules.on_event("response.done", {})
    assert len(wire.sent) == 2  # once, not on every response.done

    await rules.request_response({"instructions": "greet", "metadata": voicebridge.GREETING_TAG})
    await rules.on_event("error", {"error": {**refused, "event_id": wire.sent[-1]["event_id"]}})
    await rules.on_event("response.done", {})
    assert len(wire.sent) == 3  # a greeting after the model has already answered the caller would be stale
    await rules.on_event("error", {"error": {"code": "other", "event_id": "vb_not_ours"}})
    assert not rules.response_active  # an error about something else changes nothing


async def test_unconfirmed_items_are_resent_once_in_order_under_their_ids_after_a_reconnect() -> None:
    rules, old, new, newer = voicebridge.Sideband(voicebridge.CallLog("rtc_rules")), Recorder(), Recorder(), Recorder()
    await rules.attach(old, again=False)  # type: ignore[arg-type]
    await rules.on_event("response.done", {})
    await rules.queue({"type": "function_call_output", "call_id": "call_1", "output": "one"})
    await rules.on_event("response.done", {})
    await rules.queue({"type": "function_call_output", "call_id": "call_2", "output": "two"})
    sent = [e["item"] for e in old.sent if e["type"] == "conversation.item.create"]
    await rules.on_event("conversation.item.added", {"item": sent[0]})  # the first was confirmed, the second not
    rules.response_active = True  # the drop: nothing can be sent until the reconnect
    await rules.queue({"type": "function_call_output", "call_id": "call_3", "output": "three"})
    assert len(old.sent) == 4
    await rules.attach(new, again=True)  # type: ignore[arg-type]
    items = [e["item"] for e in new.sent if e["type"] == "conversation.item.create"]
    assert [i["call_id"] for i in items] == ["call_2", "call_3"] and items[0]["id"] == sent[1]["id"]
    assert new.kinds()[-1] == "response.create" and new.kinds().count("response.create") == 1
    for item in items:
        await rules.on_event("conversation.item.added", {"item": item})
    await rules.attach(newer, again=True)  # type: ignore[arg-type]
    assert newer.sent == []  # all confirmed: nothing to resend, no response to ask for


# --- Restarts, through real processes sharing one STATE_DIR -------------------------------------------------



@dataclass
class Running:
    """One `python voicebridge.py` process on its own port, its output collected line by line as it comes."""

    proc: asyncio.subprocess.Process
    port: int
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    async def read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace"))

    async def logged(self, text: str, timeout: float = 10.0) -> None:
        """Wait until the log holds `text` (or the process has died, which fails with the whole log)."""
        deadline = time.monotonic() + timeout
        while text not in self.log and self.proc.returncode is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert text in self.log, f"{text!r} not logged within {timeout:g}s:\n{self.log}"

    async def health(self) -> tuple[int, dict[str, Any]]:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{self.base}/healthz") as resp:
                return resp.status, await resp.json()
        except aiohttp.ClientConnectionError:
            return 0, {}

    async def deliver(self, call_id: str, from_value: str | None = None) -> None:
        """OpenAI's signed realtime.call.incoming webhook for call_id (from ALICE, or `from_value`), to this process."""
        body = incoming_event(call_id) if from_value is None else incoming_event(call_id, from_value)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.base}/webhook", data=body, headers=sign(body)) as resp:
                assert resp.status == 200, await resp.text()

    async def finish(self, timeout: float = 15.0) -> tuple[int, str]:
        """Wait for the process to exit: (exit status, its whole output)."""
        await asyncio.wait_for(self.proc.wait(), timeout)
        assert self.reader is not None and self.proc.returncode is not None
        await asyncio.wait_for(self.reader, 5)
        return self.proc.returncode, self.log

    async def stop(self) -> tuple[int, str]:
        """SIGTERM, as systemd stops the service."""
        self.proc.send_signal(signal.SIGTERM)
        return await self.finish()

    async def kill(self) -> None:
        """SIGKILL: the crash (or OOM kill) that restart recovery exists for; nothing gets to clean up."""
        self.proc.kill()
        await self.finish()


Start = Callable[[dict[str, str]], Awaitable[Running]]


@pytest.fixture
async def bridges(openai: FakeOpenAI, openclaw: FakeOpenClaw) -> AsyncIterator[Start]:
    """start(env) runs voicebridge with env on a new port and waits until /healthz answers; all are killed at the end
    (before the fakes stop: this fixture depends on them)."""
    started: list[Running] = []

    async def start(env: dict[str, str]) -> Running:
        port = free_port()
        running = Running(await run_voicebridge({**env, "PORT": str(port)}), port)
        running.reader = asyncio.create_task(running.read())
        started.append(running)
        deadline = time.monotonic() + 20
        while (await running.health())[0] != 200:
            assert time.monotonic() < deadline and running.proc.returncode is None, f"did not start:\n{running.log}"
            await asyncio.sleep(0.05)
        return running

    yield start
    for number, running in enumerate(started):
        if running.proc.returncode is None:
            running.proc.kill()
            await running.proc.wait()
        if running.reader is not None:
            await asyncio.wait_for(running.reader, 5)
        name = "AB"[number] if number < 2 else str(number)
        print(f"--- process {name} (port {running.port}) ---\n{running.log}")  # pytest shows it if the test failed


def state_env(openai: FakeOpenAI, openclaw: FakeOpenClaw, state_dir: Path, **overrides: str) -> dict[str, str]:
    """The settings both processes of a restart share: one STATE_DIR; SHUTDOWN_GRACE=0 so a SIGTERM ends at once."""
    return make_env(openai, openclaw, STATE_DIR=str(state_dir), SHUTDOWN_GRACE="0", **overrides)


async def call_on(bridge: Running, openai: FakeOpenAI, call_id: str) -> FakeCall:
    """Ring, deliver the webhook to this process, and wait until the sideband is up and the greeting spoken."""
    call = openai.ring(call_id)
    await bridge.deliver(call_id)
    await eventually(lambda: call.ws is not None and call.response_creates())
    await call.wait_idle()
    return call


async def ask(call: FakeCall, question: str) -> dict[str, Any]:
    """One ask_openclaw round on the call's current sideband; the function_call_output it got (without its id)."""
    [call_id] = await call.model_response([("ask_openclaw", json.dumps({"request": question}))])
    output: dict[str, Any] = await eventually(lambda: next((o for o in call.outputs() if o["call_id"] == call_id),
                                                           None))
    return output


def live_calls(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The store's live_calls rows by call_id, read as an operator would: read-only, beside the running service."""
    uri = f"file:{state_dir / 'voicebridge.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        db.row_factory = sqlite3.Row
        rows: dict[str, dict[str, Any]] = {row["call_id"]: dict(row) for row in db.execute("SELECT * FROM live_calls")}
        return rows


async def recorded(state_dir: Path, call_id: str, **columns: Any) -> None:
    """Wait until the store's row for call_id has these values (in_flight as a list). A SIGKILL keeps only what the
    store's thread has written, a moment after the event that caused it, so the recovery tests kill once the state
    they are about is on disk."""

    def row() -> dict[str, Any] | None:
        try:
            found = live_calls(state_dir).get(call_id)
        except sqlite3.OperationalError:  # (not created yet)
            return None
        if found is not None:
            found["in_flight"] = json.loads(found["in_flight"])
        return found

    await eventually(lambda: (found := row()) is not None and all(found[k] == v for k, v in columns.items()))


async def left_by_a_crash(bridges: Start, openai: FakeOpenAI, env: dict[str, str], call_id: str) -> FakeCall:
    """A call live on a voicebridge that is then killed (SIGKILL) once its store holds the call."""
    running = await bridges(env)
    call = await call_on(running, openai, call_id)
    await recorded(Path(env["STATE_DIR"]), call_id)
    await running.kill()
    return call


def questions_asked(openclaw: FakeOpenClaw) -> list[str]:
    return [m["content"] for body in openclaw.requests for m in body["messages"] if m["role"] == "user"]


# --- Restart recovery ----------------------------------------------------------------------------------------


async def test_a_call_whose_question_was_with_openclaw_is_resumed_after_sigkill(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    env = state_env(openai, openclaw, tmp_path / "state")
    a = await bridges(env)
    call = await call_on(a, openai, "rtc_resume")
    openclaw.delay = 30  # the question is still with OpenClaw when A dies
    [pending] = await call.model_response([("ask_openclaw", '{"request": "Book the dentist for Friday"}')])
    await eventually(lambda: openclaw.requests)
    await recorded(tmp_path / "state", "rtc_resume", in_flight=[pending])
    await a.kill()
    await eventually(lambda: openclaw.cancelled)  # A's request died with it
    dead_ws, attempts, received = call.ws, len(call.sideband_attempts), len(call.received)

    openclaw.delay = 0
    b = await bridges(env)
    await b.logged("resuming 1 call(s) left by the previous run")
    await b.logged("[rtc_resume] resumed after a restart")

    # Attached again to the same call, by call_id, with the same key (an attach by another project's key is a 404).
    await eventually(lambda: call.ws is not None and call.ws is not dead_ws)
    again = call.sideband_attempts[attempts:]
    assert again and all(query == "call_id=rtc_resume" for _, query, _ in again)
    assert all(headers["Authorization"] == f"Bearer {API_KEY}" and "OpenAI-Beta" not in headers
               for _, _, headers in again)

    # The model learns the question may or may not have been done (an attach replays nothing, so it would wait for
    # that output forever), and is asked to respond to it; the caller is not greeted a second time.
    def told() -> list[int]:
        return [i for i, e in enumerate(call.received) if i >= received and e["type"] == "conversation.item.create"
                and e["item"].get("call_id") == pending]

    await eventually(lambda: told() and len(call.received) > told()[-1] + 1)
    [at] = told()
    assert call.received[at]["item"]["output"] == voicebridge.RESTARTED
    assert call.received[at + 1]["type"] == "response.create"
    await call.wait_idle()
    after = call.received[received:]
    assert not [e for e in after if e["type"] == "response.create" and "Greet" in json.dumps(e.get("response"))]
    assert questions_asked(openclaw).count("Book the dentist for Friday") == 1  # never run twice: it may have been done

    # And the call goes on: the next question on the re-attached sideband is answered.
    assert (await ask(call, "What is on tomorrow?"))["output"] == "Answer to: What is on tomorrow?"
    assert call.errors == [] and call.state == "accepted"

    code, output = await b.stop()
    assert code == 0 and "Traceback" not in output and API_KEY not in output, output


async def test_max_call_seconds_counts_from_the_accept_not_from_the_restart(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    env = state_env(openai, openclaw, tmp_path / "state", MAX_CALL_SECONDS="12")
    a = await bridges(env)
    call = await call_on(a, openai, "rtc_deadline")
    await recorded(tmp_path / "state", "rtc_deadline")
    assert call.accepted_at is not None
    await asyncio.sleep(max(0.0, call.accepted_at + 2 - time.monotonic()))
    await a.kill()

    restart = time.monotonic()
    b = await bridges(env)
    await eventually(lambda: call.hangup_at, timeout=15)
    assert call.hangup_at is not None
    assert 11 <= call.hangup_at - call.accepted_at < 13.5  # accept + 12 s
    assert call.hangup_at - restart < 11  # restart + 12 s would be 14 s or more after the accept
    await b.logged("call reached MAX_CALL_SECONDS=12")
    await b.logged("reason=max_duration")
    code, output = await b.stop()
    assert code == 0 and "Traceback" not in output, output


async def test_a_call_already_past_max_call_seconds_is_hung_up_at_startup_without_an_attach(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    env = state_env(openai, openclaw, tmp_path / "state")  # MAX_CALL_SECONDS: the default 900
    call = await left_by_a_crash(bridges, openai, env, "rtc_too_old")
    # The service was down for longer than the call may last: age the record (the schema is the durable format).
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "voicebridge.db")) as db, db:
        aged = db.execute("UPDATE live_calls SET accepted_at = accepted_at - 1000 WHERE call_id = 'rtc_too_old'")
        assert aged.rowcount == 1
    attempts = len(call.sideband_attempts)

    b = await bridges(env)
    await eventually(lambda: call.hangup_at)
    await b.logged("[rtc_too_old] call summary")
    assert "reason=max_duration" in b.log and "past MAX_CALL_SECONDS" in b.log
    assert len(call.sideband_attempts) == attempts  # nothing to attach to: a call that old is only hung up
    assert openai.rest.count(("hangup", "rtc_too_old")) == 1
    assert (await b.health())[1]["active_calls"] == 0
    code, output = await b.stop()
    assert code == 0 and "Traceback" not in output, output


async def test_a_caller_who_typed_the_pin_is_not_asked_again_after_a_restart(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    env = state_env(openai, openclaw, tmp_path / "state", CALL_PIN="2468", PIN_TIMEOUT="10")
    a = await bridges(env)
    unlocked = await call_on(a, openai, "rtc_pin_typed")
    locked = await call_on(a, openai, "rtc_pin_not_typed")
    await unlocked.press("2468")
    await eventually(lambda: voicebridge.PIN_ACCEPTED in unlocked.notes())
    await recorded(tmp_path / "state", "rtc_pin_typed", pin_ok=1)
    await recorded(tmp_path / "state", "rtc_pin_not_typed", pin_ok=0)
    await a.kill()
    dead = unlocked.ws, locked.ws

    b = await bridges(env)
    await b.logged("resuming 2 call(s) left by the previous run")
    await b.logged("[rtc_pin_typed] resumed after a restart")
    await b.logged("[rtc_pin_not_typed] resumed after a restart")
    await eventually(lambda: unlocked.ws not in (None, dead[0]) and locked.ws not in (None, dead[1]))
    assert (await ask(unlocked, "Read my email"))["output"] == "Answer to: Read my email"
    assert (await ask(locked, "Read their email"))["output"] == voicebridge.PIN_NEEDED
    assert questions_asked(openclaw) == ["Read my email"]
    assert unlocked.errors == [] and locked.errors == []
    assert unlocked.state == locked.state == "accepted"
    code, output = await b.stop()
    assert code == 0 and "Traceback" not in output and "2468" not in output, output


async def test_a_404_on_the_attach_after_a_restart_means_the_call_is_over(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    env = state_env(openai, openclaw, tmp_path / "state")
    call = await left_by_a_crash(bridges, openai, env, "rtc_gone")
    call.state = "ended"  # the caller hung up while no process watched: from now on the sideband and hangup get 404
    attempts = len(call.sideband_attempts)

    b = await bridges(env)
    await b.logged("[rtc_gone] call summary")
    assert 1 <= len(call.sideband_attempts) - attempts <= 3  # no retrying a call that is over
    assert openai.rest.count(("hangup", "rtc_gone")) == 1  # answered 404, which is fine
    assert not [line for line in b.lines if " WARNING " in line or " ERROR " in line], b.log  # an ordinary end
    assert "sideband refused (HTTP 404): the call is over" in b.log and "reason=caller_hung_up" in b.log
    assert (await b.health())[1]["active_calls"] == 0
    await eventually(lambda: live_calls(tmp_path / "state") == {})  # gone from the store too: no resume next time
    code, output = await b.stop()
    assert code == 0 and "Traceback" not in output, output


async def test_the_pin_lock_survives_a_restart(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    env = state_env(openai, openclaw, tmp_path / "state", CALL_PIN="2468")
    a = await bridges(env)
    assert voicebridge.PIN_LOCK_AFTER == 10 and voicebridge.PIN_TRIES == 3
    for n in (1, 2, 3):  # 3 wrong PINs each: every call is hung up after its third
        guesser = await call_on(a, openai, f"rtc_guess_{n}")
        await guesser.press("1357" * 3)
        await eventually(lambda: guesser.hangup_at, timeout=15)
    last = await call_on(a, openai, "rtc_guess_4")
    await last.press("1357")  # the 10th
    await a.logged("new calls are turned away until")
    locked_until = (await a.health())[1]["pin_locked_until"]
    assert locked_until
    code, output = await a.stop()
    assert code == 0, output

    b = await bridges(env)
    assert (await b.health())[1]["pin_locked_until"] == locked_until
    late = openai.ring("rtc_after_restart")
    await b.deliver("rtc_after_restart")
    await eventually(lambda: late.state == "rejected")
    assert late.reject_body == {"status_code": 603} and late.accept_body is None
    assert "too many wrong PINs, the line is locked until" in b.log
    code, output = await b.stop()
    assert code == 0 and "Traceback" not in output, output


async def test_a_clean_stop_leaves_no_live_call_in_a_private_store(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"  # not there yet: voicebridge creates it
    a = await bridges(state_env(openai, openclaw, state_dir))
    await call_on(a, openai, "rtc_clean")
    await recorded(state_dir, "rtc_clean")  # there while the call is live
    code, output = await a.stop()
    assert code == 0 and "reason=shutdown" in output, output
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / "voicebridge.db").stat().st_mode) == 0o600
    for leftover in state_dir.glob("voicebridge.db-*"):  # WAL and shared memory, if any are left: as private
        assert stat.S_IMODE(leftover.stat().st_mode) == 0o600, leftover
    assert live_calls(state_dir) == {}  # hung up and forgotten: the next start resumes nothing


async def test_a_call_is_recorded_before_its_accept_and_a_stalled_disk_delays_no_tool_round(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    # A call accepted but unknown to the store would be billed, after a crash, until OpenAI's 60-minute cap: the
    # accept waits for the record, RECORD_WAIT at most. A tool round never waits for the disk. The stall here is
    # another connection holding the write lock, which stalls the store's thread as a slow SD card would.
    state_dir = tmp_path / "state"
    a = await bridges(state_env(openai, openclaw, state_dir))
    healthy = openai.ring("rtc_healthy")
    healthy.on_accept = lambda: live_calls(state_dir).get("rtc_healthy")  # what the store holds as the accept arrives
    await a.deliver("rtc_healthy")
    await eventually(lambda: healthy.accept_seen)
    assert healthy.accept_seen["agent"] == "main"  # recorded first
    with contextlib.closing(sqlite3.connect(state_dir / "voicebridge.db", isolation_level=None)) as disk:
        disk.execute("BEGIN IMMEDIATE")  # held well inside the store's busy timeout (5 s): its writes wait, not fail
        stalled = openai.ring("rtc_stalled")
        sent = time.monotonic()
        await a.deliver("rtc_stalled")
        await eventually(lambda: stalled.accepted_at, timeout=3)
        assert stalled.accepted_at is not None
        assert voicebridge.RECORD_WAIT * 0.9 <= stalled.accepted_at - sent < 1.5  # delayed by RECORD_WAIT, no more
        await eventually(lambda: stalled.ws is not None and stalled.response_creates())
        await stalled.wait_idle()
        asked = time.monotonic()
        await stalled.model_response([("ask_openclaw", '{"request": "Cancel my 3 pm"}')])
        await eventually(lambda: stalled.outputs(), timeout=3)
        assert time.monotonic() - asked < voicebridge.RECORD_WAIT  # the round did not wait for the disk
        disk.execute("ROLLBACK")
    await recorded(state_dir, "rtc_stalled", in_flight=[])  # the records land once the disk is back
    assert questions_asked(openclaw) == ["Cancel my 3 pm"]


async def test_the_silence_clock_starts_again_at_the_resume(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    # No process heard the line while the service was down, and the model went on talking with the caller: a resumed
    # call is not "silent since its accept", so B must not open with "are you still there?".
    env = state_env(openai, openclaw, tmp_path / "state", IDLE_SECONDS="10")
    call = await left_by_a_crash(bridges, openai, env, "rtc_talking")
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "voicebridge.db")) as db, db:
        db.execute("UPDATE live_calls SET accepted_at = accepted_at - 60")  # down for a minute, in a long call
    received = len(call.received)

    b = await bridges(env)
    await b.logged("[rtc_talking] resumed after a restart")
    await asyncio.sleep(1.0)  # the check would go out at once
    asked = [e for e in call.received[received:] if voicebridge.IDLE_CHECK in json.dumps(e.get("response"))]
    assert asked == [] and "asking whether anyone is there" not in b.log, b.log
    assert call.state == "accepted"


@pytest.mark.parametrize("where", ["under /proc", "under a regular file"])
async def test_a_state_dir_that_cannot_be_created_stops_startup_with_one_line(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("not a folder\n")
    state_dir = "/proc/voicebridge-test" if where == "under /proc" else str(tmp_path / "file" / "sub")
    env = {"OPENAI_API_KEY": API_KEY, "OPENAI_WEBHOOK_SECRET": SECRET, "ALLOWED_CALLERS": "+15551234567",
           "OPENCLAW_URL": "http://127.0.0.1:9", "PORT": str(free_port()), "STATE_DIR": state_dir}
    proc = await run_voicebridge(env)
    try:
        code, output = await output_of(proc, timeout=20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code != 0, output
    assert "Traceback" not in output, output
    named = [line for line in output.splitlines() if state_dir in line]
    assert len(named) == 1 and f"STATE_DIR={state_dir}" in named[0], output


# --- The call history and --calls ------------------------------------------------------------------------


async def calls_cli(state_dir: str, *args: str) -> tuple[int, str, str]:
    """`python voicebridge.py --calls ARGS`, as the owner runs it beside the service: (exit status, stdout, stderr)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OPENCLAW_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "voicebridge.py"), "--calls", *args, env={**base, "STATE_DIR": state_dir},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


def history_rows(state_dir: str) -> dict[str, dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(f"file:{state_dir}/voicebridge.db?mode=ro", uri=True)) as db:
        return {call_id: json.loads(record) for call_id, record in db.execute("SELECT call_id, record FROM history")}


def tokens_of(call: FakeCall) -> dict[str, int]:
    """What the history should count for a call: every response.done the fake sent it carried USAGE."""
    done = sum(e["type"] == "response.done" for e in call.sent)
    return {"input": 300 * done, "input_text": 120 * done, "input_audio": 180 * done, "input_cached": 64 * done,
            "output": 80 * done, "output_text": 20 * done, "output_audio": 60 * done}


async def test_the_history_keeps_every_call_and_calls_shows_it_masked(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, tmp_path: Path
) -> None:
    state_dir = str(tmp_path / "state")
    bridge = await start_bridge(STATE_DIR=state_dir, ALLOWED_CALLERS=f"{ALICE},{BOB}", LOG_TRANSCRIPTS="1",
                                idle_seconds=0.5)

    async def ring(call_id: str, number: str) -> tuple[FakeCall, float]:
        call, sent = openai.ring(call_id), time.monotonic()
        assert (await post_webhook(bridge, incoming_event(call_id, f"<sip:{number}@sip.example.com>"))).status == 200
        await eventually(lambda: call.ws is not None and call.response_creates())
        await call.wait_idle()
        return call, sent

    answered, rang = await ring("rtc_answered", ALICE)  # answered, with a transcript, then the caller hangs up
    openclaw.delay = 0.3
    await answered.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_u1",
                         "content_index": 0, "transcript": "What's on today?"})
    await answered.caller_speaks([("ask_openclaw", '{"request": "what is on today"}')])
    await eventually(lambda: answered.outputs())
    await answered.caller_hangs_up()
    failed, _ = await ring("rtc_failed", BOB)  # OpenClaw fails, then the model ends the call
    openclaw.delay, openclaw.mode = 0.0, "500"
    await failed.caller_speaks([("ask_openclaw", '{"request": "read my mail"}')])
    await eventually(lambda: failed.outputs())
    await failed.model_response([("end_call", "{}")])
    await eventually(lambda: failed.state == "ended")
    openclaw.mode = "ok"
    away = openai.ring("rtc_away")  # not listed: turned away
    assert (await post_webhook(bridge, incoming_event("rtc_away", "<sip:+15550001111@x.example.com>"))).status == 200
    await eventually(lambda: away.state == "rejected")
    idle, _ = await ring("rtc_idle", ALICE)  # nobody speaks: asked once, then hung up
    await eventually(lambda: idle.state == "ended", timeout=5)
    cut, _ = await ring("rtc_cut", ALICE)  # the caller hangs up while OpenClaw works on the question
    openclaw.delay = 5.0
    await cut.caller_speaks([("ask_openclaw", '{"request": "a long job"}')])
    await eventually(lambda: openclaw.requests)
    code, live, _ = await calls_cli(state_dir)  # read while a call is live and the service writes
    assert code == 0 and "rtc_" not in live and live.count("\n") >= 4, live
    await cut.caller_hangs_up()
    await eventually(lambda: len(history_rows(state_dir)) == 5, timeout=5)

    code, out, err = await calls_cli(state_dir, "--json")
    assert code == 0 and err == "", err
    calls = [json.loads(line) for line in out.splitlines()]
    assert [c["call_id"] for c in calls] == ["rtc_cut", "rtc_idle", "rtc_away", "rtc_failed", "rtc_answered"]
    by_id = {c["call_id"]: c for c in calls}
    fields = {"call_id", "caller", "agent", "started", "start", "end", "seconds", "turned_away", "end_reason",
              "first_word", "questions", "pin", "reconnects", "resumed", "tokens", "timeline", "transcript"}
    assert all(set(c) == fields for c in calls)
    assert ALICE not in out and BOB not in out and by_id["rtc_answered"]["caller"] == "+1******4567"
    assert [by_id[i]["end_reason"] for i in ("rtc_answered", "rtc_failed", "rtc_idle", "rtc_cut")] == [
        "caller_hung_up", "end_call", "idle", "caller_hung_up"]
    a = by_id["rtc_answered"]
    assert a["agent"] == "main" and a["pin"] is None and a["reconnects"] == 0 and a["resumed"] is False
    assert a["turned_away"] is None and a["tokens"] == tokens_of(answered)
    assert datetime.fromisoformat(a["start"]) <= datetime.fromisoformat(a["end"]) and 0.3 < a["seconds"] < 10
    steps: dict[str, float] = {}
    for at, text in a["timeline"]:
        steps.setdefault(text, at)  # the first time of each step
    assert list(steps)[:7] == ["webhook arrived", "accept sent", "accepted", "sideband open",
                               "greeting asked for at minimal reasoning", "greeting started", "greeting audio started"]
    audio = next(e["_at"] for e in answered.sent if e["type"] == "output_audio_buffer.started")
    assert a["first_word"] == steps["greeting audio started"] and audio - rang - 0.1 < a["first_word"] <= audio - rang
    [question] = a["questions"]
    assert question["outcome"] == "answered" and 0.3 <= question["seconds"] < 2 and "why" not in question
    assert a["transcript"][:2] == [f"assistant said: {GREETING_SPOKEN}", "caller said: What's on today?"]
    [question] = by_id["rtc_failed"]["questions"]
    assert question["outcome"] == "failed" and "HTTP 500: upstream model failed" in question["why"]
    assert by_id["rtc_failed"]["caller"] == "+1******4321" and by_id["rtc_failed"]["tokens"] == tokens_of(failed)
    assert by_id["rtc_away"]["turned_away"] == "not listed" and by_id["rtc_away"]["end_reason"] is None
    assert by_id["rtc_away"]["timeline"] == [[0.0, "turned away with SIP 603: caller not in ALLOWED_CALLERS"]]
    assert by_id["rtc_idle"]["questions"] == [] and by_id["rtc_idle"]["first_word"] > 0
    [question] = by_id["rtc_cut"]["questions"]
    assert question["outcome"] == "cancelled by the hangup" and 0 < question["seconds"] < 5

    code, table, _ = await calls_cli(state_dir)
    lines = table.splitlines()
    assert code == 0 and lines[0].split() == ["when", "caller", "agent", "duration", "questions", "first", "word",
                                               "tokens", "how", "it", "ended"]
    assert [line.split()[-1] for line in lines[1:6]] == ["caller_hung_up", "idle", "listed", "end_call",
                                                         "caller_hung_up"]
    assert lines[3].split()[2:] == ["+1******1111", "-", "-", "0", "-", "-", "turned", "away:", "not", "listed"]
    assert lines[5].split()[1] == f"{datetime.fromtimestamp(a['started']):%H:%M:%S}"  # the machine's local time
    assert lines[5].split()[4:8] == [f"{a['seconds']:.1f}s", "1", f"{a['first_word']:.2f}s",
                                      f"{a['tokens']['input'] + a['tokens']['output']:,}"]
    assert "5 call(s) above: 4 accepted, 1 turned away" in table
    assert "how they ended      caller_hung_up 2, idle 1, turned away: not listed 1, end_call 1" in table
    assert "OpenClaw answers    p50 0.3s, p95 0.3s (of 1)" in table and "time to first word  p50 " in table
    assert ALICE not in table and BOB not in table and "https://developers.openai.com/api/docs/pricing" in table

    code, timeline, _ = await calls_cli(state_dir, "rtc_failed")
    assert code == 0 and "call rtc_failed from +1******4321, agent main" in timeline
    assert re.search(r"question 1 sent to OpenClaw\n.*question 1 failed after \d\.\ds: HTTP 500: upstream", timeline)
    assert timeline.index("greeting audio started") < timeline.index("question 1") < timeline.index("ended: end_call")
    assert f"transcript:\n  assistant said: {GREETING_SPOKEN}\n  caller said: What's on today?" in (
        await calls_cli(state_dir, "rtc_answered"))[1]
    assert BOB in (await calls_cli(state_dir, "rtc_failed", "--show-numbers"))[1]
    assert ALICE in (await calls_cli(state_dir, "--show-numbers"))[1]
    assert len((await calls_cli(state_dir, "--last", "2"))[1].splitlines()) == 1 + 2 + 7
    code, _, err = await calls_cli(state_dir, "rtc_nonesuch")
    assert code == 1 and f"no call rtc_nonesuch in the history in {state_dir}/voicebridge.db" in err


async def test_calls_without_a_history_says_so_and_names_the_folder_it_read(tmp_path: Path) -> None:
    code, out, err = await calls_cli(str(tmp_path / "never"))
    assert code == 0 and out == "" and f"no call history yet in {tmp_path}/never/voicebridge.db" in err
    assert not (tmp_path / "never").exists()  # read-only: nothing created
    code, _, err = await calls_cli(str(tmp_path), "--json", "--last", "0")
    assert code == 2 and "--last needs a number of calls, 1 or more" in err
    proc = await run_voicebridge({}, "--json")
    code, output = await output_of(proc)
    assert code == 2 and "--last, --json and --show-numbers go with --calls" in output


async def test_history_days_prunes_old_calls_at_startup_and_zero_keeps_none(
    start_bridge: Bridge, openai: FakeOpenAI, tmp_path: Path
) -> None:
    state_dir = str(tmp_path / "state")
    bridge = await start_bridge(STATE_DIR=state_dir, HISTORY_DAYS="2")
    call = await connected_call(bridge, openai, "rtc_recent")
    await call.caller_hangs_up()
    await eventually(lambda: "rtc_recent" in history_rows(state_dir))
    await bridge.close()
    with contextlib.closing(sqlite3.connect(f"{state_dir}/voicebridge.db")) as db, db:
        old = voicebridge.history_record("rtc_old", ALICE, "main", time.time() - 3 * 86400, end_reason="idle")
        db.execute("INSERT INTO history VALUES (?, ?, ?)", ("rtc_old", old["started"], json.dumps(old)))
    assert set(history_rows(state_dir)) == {"rtc_recent", "rtc_old"}
    bridge = await start_bridge(STATE_DIR=state_dir, HISTORY_DAYS="2")  # a restart: older than 2 days goes
    await eventually(lambda: set(history_rows(state_dir)) == {"rtc_recent"})
    await bridge.close()
    bridge = await start_bridge(STATE_DIR=state_dir, HISTORY_DAYS="0")  # 0: none kept, none written
    await eventually(lambda: history_rows(state_dir) == {})
    call = await connected_call(bridge, openai, "rtc_unkept")
    await call.caller_hangs_up()
    await eventually(lambda: calls_over(bridge))
    await bridge.close()
    assert history_rows(state_dir) == {}


# --- The first hour: settings files, errors all at once, exit status 78, the journal ----------------------


async def run_with_file(tmp_path: Path, text: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`voicebridge.py --env-file FILE ARGS` with only this file's settings (and `env`), as the unit would run it."""
    (tmp_path / "voicebridge.env").write_text(text)
    return await output_of(await run_voicebridge(env or {}, "--env-file", str(tmp_path / "voicebridge.env"), *args))


async def test_the_untouched_env_example_names_both_placeholders_in_one_run_and_exits_78(tmp_path: Path) -> None:
    code, output = await run_with_file(tmp_path, (HERE / ".env.example").read_text(), env={"PORT": str(free_port())})
    assert code == 78, output
    assert output.splitlines() == [
        "voicebridge: configuration error: OPENAI_API_KEY is still the placeholder from .env.example: put your "
        f"OpenAI API key in {tmp_path}/voicebridge.env",
        "voicebridge: configuration error: OPENAI_WEBHOOK_SECRET is still the placeholder from .env.example: copy "
        "the webhook's signing secret from OpenAI's dashboard",
    ]


async def test_every_broken_setting_is_named_in_one_run(tmp_path: Path) -> None:
    text = f"OPENAI_API_KEY={API_KEY}\nOPENAI_WEBHOOK_SECRET=whsec_%%%\nPORT=http\nLOG_LEVEL=loud\nCALL_PIN=12\n"
    code, output = await run_with_file(tmp_path, text)
    lines = output.splitlines()
    assert code == 78 and len(lines) == 4 and all(line.startswith("voicebridge: configuration error: ") for line in lines)
    for named in ("OPENAI_WEBHOOK_SECRET is not valid base64", "PORT='http' is not a number", "LOG_LEVEL='LOUD'",
                  "CALL_PIN must be 4 to 12 digits"):
        assert any(named in line for line in lines), output
    assert API_KEY not in output and "Traceback" not in output


def test_a_settings_file_is_read_as_python_dotenv_reads_it_and_a_line_it_cannot_read_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.env"
    good.write_text("\ufeff# a comment, after the byte order mark an editor added\n\n  GREETING=Greet the caller by name  \n"
                    'export OPENCLAW_TOKEN="abc # not a note"  # the token\n'
                    "INSTRUCTIONS='Say \"hi\", costs $0'\nEMPTY=\nOPENCLAW_URL=http://127.0.0.1:1?a=b\n"
                    "CALL_PIN = 123456 # a note after a space\nOPENCLAW_AGENT=main#not-a-note\n"
                    'OPENAI_API_KEY="sk-$HOME\\"x"\n')
    assert voicebridge.read_settings(good, required=True) == ({
        "GREETING": "Greet the caller by name", "OPENCLAW_TOKEN": "abc # not a note",
        "INSTRUCTIONS": 'Say "hi", costs $0', "EMPTY": "", "OPENCLAW_URL": "http://127.0.0.1:1?a=b",
        "CALL_PIN": "123456", "OPENCLAW_AGENT": "main#not-a-note", "OPENAI_API_KEY": 'sk-$HOME"x'}, [])  # $: literal
    bad = tmp_path / "bad.env"
    bad.write_text('OPENAI_API_KEY=sk-fine\nCALL_PIN="123456\nOPENCLAW_AGENT=main\njust words\nVOICE\n')
    values, problems = voicebridge.read_settings(bad, required=True)
    assert values == {"OPENAI_API_KEY": "sk-fine", "OPENCLAW_AGENT": "main"}  # and never CALL_PIN
    assert [problem.split(": ")[0] for problem in problems] == [f"{bad}, line {n}" for n in (2, 4, 5)]
    assert all("python-dotenv cannot read this line" in problem and "KEY=value" in problem for problem in problems)
    with pytest.raises(ConfigError, match=f"^--env-file {tmp_path}/none.env: there is no such file$"):
        voicebridge.read_settings(tmp_path / "none.env", required=True)
    assert voicebridge.read_settings(tmp_path / "none.env", required=False) == ({}, [])


@pytest.mark.parametrize("text", ['CALL_PIN="123456\n', 'CALL_PIN="123456\nGREETING=Say it"\n',
                                  "CALL_PIN='123456\n"])
async def test_a_pin_with_an_unclosed_quote_never_runs_the_service_without_a_pin(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, tmp_path: Path, text: str
) -> None:
    settings = "".join(f"{key}={value}\n" for key, value in make_env(openai, openclaw).items())
    code, output = await run_with_file(tmp_path, settings + text, env={"PORT": str(free_port())})
    assert code == 78 and "Traceback" not in output and "listening" not in output, output
    assert (f"{tmp_path}/voicebridge.env, line {len(settings.splitlines()) + 1}: python-dotenv cannot read" in output
            or "CALL_PIN must be 4 to 12 digits" in output), output  # (a quote closed lines later: no PIN either)


def test_an_unreadable_settings_file_names_the_file_the_user_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (As root, which runs these tests, no file mode refuses a read: the refusal itself is simulated.)
    def refused(self: Path, *args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refused)
    user = voicebridge.pwd.getpwuid(os.geteuid()).pw_name
    with pytest.raises(ConfigError) as refusal:
        voicebridge.read_settings(tmp_path / "voicebridge.env", required=True)
    assert str(refusal.value) == (f"cannot read {tmp_path}/voicebridge.env as user {user} (permission denied): let "
                                  f"that user read it, e.g. sudo chown root:{user} {tmp_path}/voicebridge.env && "
                                  f"sudo chmod 640 {tmp_path}/voicebridge.env")


async def test_the_env_file_wins_over_the_environment_and_the_env_beside_the_script(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, tmp_path: Path
) -> None:
    text = f"OPENCLAW_URL={openclaw.url}\nOPENCLAW_TOKEN={CLAW_TOKEN}\nGREETING=Greet the caller by name\n"
    code, output = await run_with_file(tmp_path, text, "--ask", "is it on?", env={"OPENCLAW_TOKEN": "from-the-shell"})
    assert code == 0 and "The caller would hear: Answer to: is it on?" in output, output
    (tmp_path / "app").mkdir()  # a copy beside a .env of its own, which --env-file must leave unread
    (tmp_path / "app" / "voicebridge.py").write_text((HERE / "voicebridge.py").read_text())
    (tmp_path / "app" / ".env").write_text(f"OPENCLAW_URL={openclaw.url}\nOPENCLAW_TOKEN={CLAW_TOKEN}\n"
                                           "OPENCLAW_AGENT=nobody\n")
    run = [sys.executable, str(tmp_path / "app" / "voicebridge.py"), "--ask", "is it on?"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OPENCLAW_"))}
    code, output = await output_of(await asyncio.create_subprocess_exec(*run, env=base, stdout=subprocess.PIPE))
    assert code == 1 and "Unknown agent 'nobody'" in output  # without --env-file: the .env beside it
    run += ["--env-file", str(tmp_path / "voicebridge.env")]
    code, output = await output_of(await asyncio.create_subprocess_exec(*run, env=base, stdout=subprocess.PIPE))
    assert code == 0 and "(agent main," in output, output
    code, output = await output_of(await run_voicebridge({}, "--env-file", str(tmp_path / "missing.env"), "--check"))
    assert code == 78 and ("FAIL  the settings file can be read\n"
                           f"      --env-file {tmp_path}/missing.env: there is no such file") in output, output
    assert "OpenClaw at" not in output  # one FAIL, and none that only follows from it


async def test_check_prints_its_whole_checklist_even_with_broken_settings(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, tmp_path: Path
) -> None:
    text = (f"OPENAI_API_KEY=sk-...\nOPENAI_WEBHOOK_SECRET={SECRET}\nOPENAI_BASE_URL={openai.url}\n"
            f"OPENCLAW_URL={openclaw.url}\nOPENCLAW_TOKEN={CLAW_TOKEN}\nALLOWED_CALLERS={ALICE}\nPORT=http\n"
            "CALL_PIN 123456\n")
    code, output = await run_with_file(tmp_path, text, "--check")
    assert code == 78, output
    assert ("FAIL  configuration complete, OPENAI_WEBHOOK_SECRET well formed\n"
            f"      {tmp_path}/voicebridge.env, line 8: python-dotenv cannot read this line") in output
    assert "\n      OPENAI_API_KEY is still the placeholder from .env.example" in output and "PORT='http'" in output
    assert "FAIL  OpenAI accepts OPENAI_API_KEY" in output and "not tried without a usable OPENAI_API_KEY" in output
    assert "ok    OpenClaw at" in output and openai.models_retrieved == []  # the probe that could run, ran
    assert "WARN  no CALL_PIN: a caller ID, which can be faked, is all it takes to reach your assistant" in output
    assert "problem(s) found." in output
    text = text.replace("sk-...", API_KEY).replace("PORT=http\n", "").replace("CALL_PIN ", "export CALL_PIN=")
    code, output = await run_with_file(tmp_path, text, "--check")
    assert code == 0 and "ok    CALL_PIN is set (6 digits)" in output, output


async def test_check_tells_a_name_that_does_not_resolve_and_a_silent_server_from_a_refused_key(
    openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    env = {**make_env(openai, openclaw), "OPENAI_BASE_URL": "https://voicebridge-test.invalid/v1"}
    code, output = await output_of(await run_voicebridge(env, "--check"))
    assert code == 1 and "HTTP 0" not in output and "check OPENAI_API_KEY" not in output, output
    assert "cannot resolve host voicebridge-test.invalid (OPENAI_BASE_URL)" in output
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda reader, writer: held.append(writer), "127.0.0.1", 0)  # never answers
    async with silent:
        port = silent.sockets[0].getsockname()[1]
        env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
        code, output = await output_of(await run_voicebridge(env, "--check"))
        for writer in held:  # (from 3.12 on, the server's close waits for its connections)
            writer.close()
    assert code == 1 and "no answer within 5 s (OPENAI_BASE_URL)" in output and "OPENAI_API_KEY" not in output.split(
        "FAIL")[1].split("\n")[1], output


async def test_a_port_in_use_is_one_line_and_no_banner(openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = await output_of(await run_voicebridge({**make_env(openai, openclaw), "PORT": str(port)}))
    assert code == 1 and "listening" not in output and "Traceback" not in output, output
    [line] = [line for line in output.splitlines() if "voicebridge:" in line]
    assert line.startswith(f"voicebridge: cannot listen on 127.0.0.1:{port} (address already in use): stop the ")


async def test_under_the_journal_each_line_carries_its_priority_and_no_timestamp(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    with journal.open("wb") as stream:  # the journal's stream, as systemd hands it over: JOURNAL_STREAM=dev:inode
        info = os.fstat(stream.fileno())
        env = {**make_env(openai, openclaw), "PORT": str(free_port()), "ALLOWED_CALLERS": "",
               "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}", "REALTIME_MODEL": "gpt-realtime"}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OPENCLAW_"))}
        proc = await asyncio.create_subprocess_exec(sys.executable, str(HERE / "voicebridge.py"), env={**base, **env},
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=stream)
        await eventually(lambda: "shut down by OpenAI" in journal.read_text(), timeout=15)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    lines = journal.read_text().splitlines()
    assert all(re.match(r"<[3467]>(DEBUG|INFO|WARNING|ERROR) ", line) for line in lines), lines
    assert any(line.startswith("<6>INFO voicebridge listening on") for line in lines)
    assert any(line.startswith("<4>WARNING REALTIME_MODEL=gpt-realtime will be shut down") for line in lines)
    assert any(line.startswith("<3>ERROR ALLOWED_CALLERS is empty") for line in lines)
    env["OPENAI_WEBHOOK_SECRET"] = "whsec_..."
    with journal.open("wb") as stream:
        info = os.fstat(stream.fileno())
        env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        proc = await asyncio.create_subprocess_exec(sys.executable, str(HERE / "voicebridge.py"), env={**base, **env},
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=stream)
        assert await asyncio.wait_for(proc.wait(), 15) == 78
    assert journal.read_text().startswith("<3>voicebridge: configuration error: OPENAI_WEBHOOK_SECRET is still")
    code, output = await output_of(await run_voicebridge({**env, "JOURNAL_STREAM": "1:2"}))  # not the journal
    assert code == 78 and output.startswith("voicebridge: configuration error:")


def test_the_unit_stops_restarting_on_a_configuration_error_and_reads_its_own_settings() -> None:
    unit = (HERE / "voicebridge.service").read_text()
    assert "\nRestartPreventExitStatus=78\n" in unit and "\nSyslogIdentifier=voicebridge\n" in unit
    assert "--env-file /etc/voicebridge.env\n" in unit and "EnvironmentFile=" not in unit
    assert voicebridge.EX_CONFIG == 78


async def test_a_store_from_before_the_history_reads_as_empty_and_the_service_upgrades_it(
    start_bridge: Bridge, openai: FakeOpenAI, tmp_path: Path
) -> None:
    (tmp_path / "state").mkdir()
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "voicebridge.db")) as db, db:
        db.executescript("""
            CREATE TABLE live_calls (call_id TEXT PRIMARY KEY, caller TEXT, agent TEXT NOT NULL,
                                     accepted_at REAL NOT NULL, pin_ok INTEGER NOT NULL, in_flight TEXT NOT NULL);
            CREATE TABLE pin_lock (id INTEGER PRIMARY KEY CHECK (id = 1), failures TEXT NOT NULL, until REAL NOT NULL,
                                   locks INTEGER NOT NULL);
            CREATE TABLE seen_calls (call_id TEXT PRIMARY KEY);
        """)  # schema 1: live calls, the PIN lock, the ids seen
        db.execute("PRAGMA user_version = 1")
    code, out, err = await calls_cli(str(tmp_path / "state"))
    assert code == 0 and out == "" and "no call history yet in" in err, err
    bridge = await start_bridge(STATE_DIR=str(tmp_path / "state"))
    call = await connected_call(bridge, openai, "rtc_after_upgrade")
    await call.caller_hangs_up()
    await eventually(lambda: "rtc_after_upgrade" in history_rows(str(tmp_path / "state")))
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "voicebridge.db")) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)


async def test_a_second_voicebridge_on_the_same_state_dir_stops_before_it_touches_the_first_ones_calls(
    bridges: Start, openai: FakeOpenAI, openclaw: FakeOpenClaw, tmp_path: Path
) -> None:
    env = state_env(openai, openclaw, tmp_path / "state")
    a = await bridges(env)
    call = await call_on(a, openai, "rtc_owned")
    handshakes = len(call.sideband_attempts)
    b = await run_voicebridge({**env, "PORT": str(free_port())})  # e.g. the owner, by hand, with the unit's file
    code, output = await output_of(b)
    assert code == 1 and "Traceback" not in output, output
    assert f"voicebridge: STATE_DIR={tmp_path / 'state'} is in use by another voicebridge" in output
    assert "resuming" not in output and len(call.sideband_attempts) == handshakes and call.state == "accepted"
    assert ("hangup", "rtc_owned") not in openai.rest and "rtc_owned" in live_calls(tmp_path / "state")


async def test_an_address_this_machine_does_not_have_is_a_configuration_error(
    openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    port = free_port()
    code, output = await output_of(await run_voicebridge({**make_env(openai, openclaw), "HOST": "192.0.2.1",
                                                          "PORT": str(port)}))  # (TEST-NET-1: nobody's)
    assert code == 78 and "Traceback" not in output, output
    [line] = output.splitlines()  # (why, in the brackets, is the OS's words: 3.13's asyncio words it its own way)
    assert line.startswith(f"voicebridge: configuration error: cannot listen on 192.0.2.1:{port} (")
    assert line.endswith("): check HOST and PORT") and "address" in line


async def test_calls_leaves_out_a_record_it_cannot_read_and_shows_the_rest(
    start_bridge: Bridge, openai: FakeOpenAI, tmp_path: Path
) -> None:
    state_dir = str(tmp_path / "state")
    bridge = await start_bridge(STATE_DIR=state_dir)
    call = await connected_call(bridge, openai, "rtc_good")
    await call.caller_hangs_up()
    await eventually(lambda: "rtc_good" in history_rows(state_dir))
    with contextlib.closing(sqlite3.connect(f"{state_dir}/voicebridge.db")) as db, db:
        db.executemany("INSERT INTO history VALUES (?, ?, ?)", [("rtc_torn", time.time(), '{"call_id": "rtc_to'),
                                                                ("rtc_odd", time.time(), '[1, 2]')])
    code, out, err = await calls_cli(state_dir)
    assert code == 0 and "caller_hung_up" in out and "1 call(s) above" in out, out + err
    assert f"2 record(s) in {state_dir}/voicebridge.db could not be read, left out" in err
    code, _, err = await calls_cli(str(tmp_path / "elsewhere"))
    assert code == 0 and "there is no voicebridge.db there (is this the service's STATE_DIR?)" in err


# --- Faults a review found: restarts, the store, the idle line, the port (issue 24) -----------------------------------


async def test_a_resumed_calls_items_never_reuse_an_id_the_crashed_run_used(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    # A conversation outlives the process: after two crashes in a row, each with a slow question, the second
    # "restarted" must not go out under an id the first resumed run already used, or the server refuses it as a
    # duplicate, and the model never learns that the question may have been done.
    env = state_env(openai, openclaw, tmp_path / "state")
    call, pending = None, []
    for run, question in enumerate(["Text my wife I am late", "Book the dentist"]):
        openclaw.delay = 30
        running = await bridges(env)
        if call is None:
            call = await call_on(running, openai, "rtc_ids")
        else:
            await running.logged("[rtc_ids] resumed after a restart")
            await eventually(lambda: any(o["call_id"] == pending[-1] for o in call.outputs()))
            await call.wait_idle()
        pending += await call.model_response([("ask_openclaw", json.dumps({"request": question}))])
        await recorded(tmp_path / "state", "rtc_ids", in_flight=pending[-1:])
        await running.kill()
    openclaw.delay = 0
    assert call is not None
    await (await bridges(env)).logged("[rtc_ids] resumed after a restart")
    await eventually(lambda: any(o["call_id"] == pending[-1] for o in call.outputs()))
    assert [o["output"] for o in call.outputs()] == [voicebridge.RESTARTED] * 2 and call.errors == []
    ids = [e["item"]["id"] for e in call.received if e["type"] == "conversation.item.create"]
    events = [e["event_id"] for e in call.received]
    assert len(set(ids)) == len(ids) and len(set(events)) == len(events)  # events too: an error points back by id
    assert all(re.fullmatch(r"[A-Za-z0-9_]{1,32}", i) for i in ids + events)  # and still short and plain


def full_disk(limit: int) -> Callable[[], None]:
    """For a child process: files cannot grow past `limit` bytes, as on a disk that fills up (EFBIG, not a signal)."""
    import resource

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limited


async def test_a_first_start_on_a_disk_that_fills_up_leaves_no_half_made_store(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    env = {**os.environ, **make_env(openai, openclaw, STATE_DIR=str(tmp_path / "state"), PORT=str(free_port()))}
    env = {k: v for k, v in env.items() if not k.startswith("OPENAI_") or k in make_env(openai, openclaw)}
    # 36 KiB: room for SQLite's shared-memory file and a few pages, not for the whole schema.
    first = subprocess.run([sys.executable, str(HERE / "voicebridge.py")], env=env, preexec_fn=full_disk(36864),
                           capture_output=True, text=True, timeout=30)
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr
    assert "cannot create or write voicebridge.db" in first.stderr
    running = await bridges(state_env(openai, openclaw, tmp_path / "state"))  # the disk has room again
    call = await call_on(running, openai, "rtc_after_full")
    await call.caller_hangs_up()
    await eventually(lambda: "rtc_after_full" in history_rows(str(tmp_path / "state")))


async def test_a_half_made_store_from_an_older_version_is_completed(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    (tmp_path / "state").mkdir()
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "voicebridge.db")) as db, db:
        db.execute("CREATE TABLE live_calls (call_id TEXT PRIMARY KEY, caller TEXT, agent TEXT NOT NULL, accepted_at "
                   "REAL NOT NULL, pin_ok INTEGER NOT NULL, in_flight TEXT NOT NULL)")  # then the disk was full
    running = await bridges(state_env(openai, openclaw, tmp_path / "state"))
    call = await call_on(running, openai, "rtc_completed")
    await call.caller_hangs_up()
    await eventually(lambda: "rtc_completed" in history_rows(str(tmp_path / "state")))
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "voicebridge.db")) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)


@pytest.mark.parametrize("what", ["not a database", "a damaged database", "another program's database"])
async def test_a_store_that_is_not_voicebridges_stops_the_service_with_78_and_says_what_to_do(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, tmp_path: Path, what: str
) -> None:
    path = tmp_path / "state" / "voicebridge.db"
    path.parent.mkdir()
    if what == "not a database":
        path.write_bytes(b"this is a text file somebody put here\n" * 100)
    else:
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
            db.executemany("INSERT INTO notes (text) VALUES (?)", [("x" * 3000,)] * 20)
        if what == "a damaged database":
            data = bytearray(path.read_bytes())
            data[4096:8192] = b"\xff" * 4096  # a page torn
            data[100:108] = b"\xff" * 8
            path.write_bytes(bytes(data))
    code, output = await output_of(await run_voicebridge(state_env(openai, openclaw, tmp_path / "state",
                                                                   PORT=str(free_port()))))
    assert code == 78 and "Traceback" not in output and "listening" not in output, output
    assert f"{path}" in output and "move" in output and "aside" in output, output
    assert "history" in output and "PIN lock" in output, output  # what goes with it


async def lone_speech_started(start_bridge: Bridge, openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch,
                              hold: float) -> FakeCall:
    """A call whose caller's speech_started comes with no later sign (audio cut mid-word), with SPEAKING_HOLD=hold."""
    monkeypatch.setattr(voicebridge, "SPEAKING_HOLD", hold)
    call = await connected_call(await start_bridge(idle_seconds=0.5), openai)
    await call.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 100, "item_id": "item_cut"})
    return call


async def test_a_lone_speech_started_holds_the_silence_clock_only_so_long(
    start_bridge: Bridge, openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    call = await lone_speech_started(start_bridge, openai, monkeypatch, hold=1.0)
    await asyncio.sleep(0.8)  # the caller is speaking: no "anyone there?" yet
    assert idle_checks(call) == []
    await eventually(lambda: idle_checks(call), timeout=3)  # their audio was cut mid-word: the hold ends
    await eventually(lambda: call.state == "ended" or ("hangup", "rtc_happy") in openai.rest, timeout=5)


async def test_a_reconnect_forgets_that_the_caller_was_speaking(
    start_bridge: Bridge, openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    call = await lone_speech_started(start_bridge, openai, monkeypatch, hold=60.0)
    await call.drop(1006)  # its speech_stopped went down with the old socket
    await eventually(lambda: call.ws is not None)
    await eventually(lambda: idle_checks(call), timeout=3)


async def test_a_clean_close_whose_check_meets_a_503_is_retried_like_any_drop(
    bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(voicebridge, "RECONNECT_DELAYS", (0.2, 0.4, 0.8))
    call = await connected_call(bridge, openai)
    call.sideband_down = True  # the same backend rotation: the first handshake gets 503
    await call.drop(1001)
    await eventually(lambda: len(call.sideband_attempts) >= 2)
    call.sideband_down = False
    await eventually(lambda: call.ws is not None, timeout=5)
    assert ("hangup", "rtc_happy") not in openai.rest and "reconnected: the call goes on" in caplog.text
    assert (await ask(call, "still there?"))["output"] == "Answer to: still there?"
    call.state = "ended"  # and a 404 after a clean close still ends the call at once
    await call.drop(1000)
    await eventually(lambda: ("hangup", "rtc_happy") in openai.rest, timeout=3)
    assert "sideband refused (HTTP 404): the call is over" in caplog.text


@pytest.mark.parametrize("sent", [b"", b"POST /webhook HTTP/1.1\r\nHost: voice.example.com\r\nContent-Le"])
async def test_a_connection_without_a_whole_request_head_is_closed_within_seconds(bridge: Any, sent: bytes) -> None:
    reader, writer = await asyncio.open_connection(bridge.server.host, bridge.server.port)
    writer.write(sent)
    started = time.monotonic()
    await asyncio.wait_for(reader.read(), 10)  # (the server closing it ends the read; else this times out)
    assert time.monotonic() - started < 10
    writer.close()


async def test_running_out_of_descriptors_is_logged_once(openai: FakeOpenAI, openclaw: FakeOpenClaw) -> None:
    import resource

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OPENCLAW_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "voicebridge.py"), env={**base, **make_env(openai, openclaw), "PORT": str(port)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, preexec_fn=few_descriptors)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                _, probe = await asyncio.open_connection("127.0.0.1", port)
                probe.close()
                break
            await asyncio.sleep(0.05)
        idle = []
        for _ in range(80):  # more idle connections than the service has descriptors
            with contextlib.suppress(OSError):
                idle.append((await asyncio.open_connection("127.0.0.1", port))[1])
        await asyncio.sleep(3.5)  # asyncio would log the refused accept() again every second
        for writer in idle:
            writer.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code, output = await output_of(proc)
    assert output.count("out of file descriptors") == 1, output
    assert "socket.accept() out of system resource" not in output and "Traceback" not in output, output


async def test_a_store_that_recovers_says_so_and_its_next_failure_is_logged_again(
    bridge: Any, openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    store = bridge.app[voicebridge.STORE]

    async def query_only(on: int) -> None:
        await asyncio.wrap_future(store._thread.submit(lambda: store._db.execute(f"PRAGMA query_only = {on}")))

    for round_ in range(2):  # the disk fills, is cleared, and fills again weeks later
        await query_only(1)
        call = await connected_call(bridge, openai, f"rtc_full_{round_}")
        await eventually(lambda: len(errors_logged(caplog)) == round_ + 1)
        await query_only(0)
        await call.caller_hangs_up()
        await eventually(lambda: caplog.text.count("state saved again") == round_ + 1)
    assert all("state not saved to" in error.getMessage() for error in errors_logged(caplog))


@pytest.mark.parametrize("setting, value", [
    ("OPENCLAW_URL", "http://owner:hunter2secret@127.0.0.1:187890"),  # a digit too many
    ("OPENCLAW_URL", "htps://owner:hunter2secret@127.0.0.1:18789"),
    ("OPENAI_BASE_URL", "https://owner:hunter2secret@"),
    ("OPENAI_BASE_URL", "api.openai.com/v1"),
])
async def test_a_mistyped_url_is_named_never_shown(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, tmp_path: Path, setting: str, value: str
) -> None:
    env = state_env(openai, openclaw, tmp_path / "state", PORT=str(free_port()), **{setting: value})
    for args in ((), ("--check",), ("--ask", "hello")):
        code, output = await output_of(await run_voicebridge(env, *args))
        assert code == 78 and "hunter2" not in output and "Traceback" not in output, output
        assert f"{setting} is not a usable URL" in output, output


def test_exception_text_never_carries_a_password() -> None:
    error = aiohttp.InvalidURL("http://owner:hunter2secret@127.0.0.1:187890/v1/chat/completions")
    assert "hunter2" not in voicebridge.exc_text(error) and "127.0.0.1" in voicebridge.exc_text(error)
    assert voicebridge.one_line("say \u202egnp.exe\u202c now") == "say \\u202egnp.exe\\u202c now"  # no RTL tricks
    assert voicebridge.mask("+1234567") == "+1****67" and voicebridge.mask("+15551234567") == "+1******4567"


async def test_a_start_that_cannot_bind_leaves_the_calls_a_crash_left(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    env = state_env(openai, openclaw, tmp_path / "state")
    call = await left_by_a_crash(bridges, openai, env, "rtc_left")
    attempts = len(call.sideband_attempts)
    with socket.socket() as taken:  # another program took the port meanwhile
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, output = await output_of(await run_voicebridge({**env, "PORT": str(taken.getsockname()[1])}))
    assert code == 1 and "cannot listen on" in output and "resuming" not in output, output
    assert len(call.sideband_attempts) == attempts and ("hangup", "rtc_left") not in openai.rest
    assert "rtc_left" in live_calls(tmp_path / "state")  # for the next start
    b = await bridges(env)
    await b.logged("[rtc_left] resumed after a restart")


async def test_a_resumed_call_follows_the_settings_it_finds(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    env = state_env(openai, openclaw, tmp_path / "state", ALLOWED_CALLERS=f"{ALICE},{BOB}")
    openclaw.agents = {"main", "family"}
    a = await bridges(env)
    moved = await call_on(a, openai, "rtc_moved")
    gone = openai.ring("rtc_gone")
    await a.deliver("rtc_gone", f"<sip:{BOB}@sip.example.com>")
    await eventually(lambda: gone.ws is not None)
    await recorded(tmp_path / "state", "rtc_moved")
    await recorded(tmp_path / "state", "rtc_gone")
    await a.kill()
    # While it was down, the owner gave ALICE an agent of her own, set a PIN, and took BOB off the list.
    b = await bridges({**env, "ALLOWED_CALLERS": f"{ALICE}=family", "CALL_PIN": "246810"})
    await b.logged("[rtc_moved] resumed after a restart")
    await eventually(lambda: ("hangup", "rtc_gone") in openai.rest)
    await b.logged("[rtc_gone] no longer in ALLOWED_CALLERS")
    assert "counts as a wrong PIN" not in b.log  # (never asked for it)
    await eventually(lambda: moved.ws is not None)
    await moved.wait_idle()
    assert (await ask(moved, "anything new?"))["output"] == voicebridge.PIN_NEEDED  # a PIN set while down is asked for
    await moved.press("246810")
    await eventually(lambda: voicebridge.PIN_ACCEPTED in moved.notes())
    await moved.wait_idle()
    assert (await ask(moved, "anything new?"))["output"] == "Answer to: anything new?"
    assert openclaw.requests[-1]["model"] == "openclaw:family"  # the agent it now has


# --- The first word sooner, the bill bounded (issue 23) ----------------------------------------------------------------


@pytest.mark.parametrize("model, reasoning", [("gpt-realtime-2.1", {"effort": "minimal"}), ("gpt-realtime-mini", None)])
async def test_the_greeting_asks_a_reasoning_model_for_minimal_reasoning_and_other_models_for_none(
    start_bridge: Bridge, openai: FakeOpenAI, model: str, reasoning: dict[str, str] | None
) -> None:
    bridge = await start_bridge(REALTIME_MODEL=model)
    call = await connected_call(bridge, openai)
    [greeting] = call.response_creates()
    assert greeting["response"].get("reasoning") == reasoning and call.errors == []
    assert call.accept_body is not None and "reasoning" not in call.accept_body  # the session keeps its default


async def test_a_greeting_refused_for_its_reasoning_is_sent_again_without_it(
    start_bridge: Bridge, openai: FakeOpenAI, tmp_path: Path
) -> None:
    bridge = await start_bridge(STATE_DIR=str(tmp_path / "state"))
    call = openai.ring("rtc_plain")
    call.refuse_reasoning = True  # what a model that takes no reasoning would do
    await post_webhook(bridge, incoming_event("rtc_plain"))
    await eventually(lambda: len(call.response_creates()) == 2)
    first, again = call.response_creates()
    assert first["response"]["reasoning"] == {"effort": "minimal"} and "reasoning" not in again["response"]
    assert again["response"]["instructions"] == first["response"]["instructions"]
    assert [error["error"]["event_id"] for error in call.errors] == [first["event_id"]]
    await eventually(lambda: any(e["type"] == "output_audio_buffer.started" for e in call.sent))  # the caller is greeted
    await call.wait_idle()
    await call.caller_hangs_up()
    await eventually(lambda: "rtc_plain" in history_rows(str(tmp_path / "state")))
    steps = [step for _, step in history_rows(str(tmp_path / "state"))["rtc_plain"]["timeline"]]
    assert steps.index("greeting asked for at minimal reasoning") < steps.index(
        "refused for its reasoning: asked for again without it") < steps.index("greeting started"), steps
    assert history_rows(str(tmp_path / "state"))["rtc_plain"]["first_word"] is not None


async def test_reasoning_effort_reaches_the_accept_of_a_reasoning_model_only(
    start_bridge: Bridge, openai: FakeOpenAI, openclaw: FakeOpenClaw, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge = await start_bridge(REASONING_EFFORT="high")
    call = await connected_call(bridge, openai)
    assert call.accept_body is not None and call.accept_body["reasoning"] == {"effort": "high"}
    mini = config_from(make_env(openai, openclaw, REASONING_EFFORT="high", REALTIME_MODEL="gpt-realtime-2.1-mini"))
    assert "reasoning" not in voicebridge.accept_payload(mini)
    assert await voicebridge.check(mini) == 0
    assert "WARN  REASONING_EFFORT=high is not sent: REALTIME_MODEL=gpt-realtime-2.1-mini" in capsys.readouterr().out


async def test_a_reasoning_effort_that_does_not_exist_exits_78_naming_it(
    openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    code, output = await output_of(await run_voicebridge({**make_env(openai, openclaw), "PORT": str(free_port()),
                                                          "REASONING_EFFORT": "maximal"}))
    assert code == 78 and "REASONING_EFFORT='maximal'" in output and "minimal, low, medium, high or xhigh" in output


async def test_the_same_question_asked_again_and_again_reaches_openclaw_once(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw
) -> None:
    call = await connected_call(bridge, openai)
    outputs = [await ask(call, "What is on my calendar tomorrow?") for _ in range(5)]
    assert questions_asked(openclaw) == ["What is on my calendar tomorrow?"]  # one agent run
    assert all(o["output"].startswith("Answer to: What is on my calendar tomorrow?") for o in outputs)
    assert "not asked again" in outputs[-1]["output"]  # the model is told it is the earlier answer
    assert (await ask(call, "And the day after?"))["output"] == "Answer to: And the day after?"


@pytest.mark.parametrize("tool", [("ask_openclaw", '{"request": "again"}'), ("send_email", "{}"),
                                  ("ask_openclaw", '{"question": "no request field"}')])
async def test_a_model_that_calls_tools_without_end_is_told_to_stop_then_hung_up(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, caplog: pytest.LogCaptureFixture, tool: tuple[str, str]
) -> None:
    call = await connected_call(bridge, openai)
    rounds = 0
    while call.state != "ended" and rounds < 3 * voicebridge.LOOP_CALLS:
        await call.model_response([tool])
        rounds += 1
        await eventually(lambda: len(call.outputs()) == rounds or call.state == "ended")
        # (and the response.create that follows each output, before the model's next round)
        await eventually(lambda: len(call.response_creates()) > rounds or call.state == "ended")
    assert rounds == voicebridge.LOOP_CALLS + 2, rounds  # told to stop at LOOP_CALLS + 1; the call after: hung up
    assert call.outputs()[voicebridge.LOOP_CALLS]["output"] == voicebridge.STOP_TOOLS
    await eventually(lambda: "reason=tool_loop" in caplog.text)  # (the summary follows the hangup)
    assert len(openclaw.requests) <= 1
    assert [r.levelname for r in caplog.records if "tool calls within" in r.getMessage()] == ["WARNING", "WARNING"]
    goodbyes = [e for e in call.response_creates() if (e.get("response") or {}).get("metadata") == voicebridge.GOODBYE_TAG]
    assert goodbyes and goodbyes[0]["response"]["instructions"] == voicebridge.LOOP_GOODBYE


async def test_a_human_conversation_of_ten_different_questions_is_untouched(
    bridge: Any, openai: FakeOpenAI, openclaw: FakeOpenClaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A caller asks a question every 7 s or so at most (say it, hear the answer): played 20 times faster here.
    monkeypatch.setattr(voicebridge, "LOOP_WINDOW", 60.0 / 20)
    call = await connected_call(bridge, openai)
    for number in range(10):
        started = time.monotonic()
        assert (await ask(call, f"Question number {number}?"))["output"] == f"Answer to: Question number {number}?"
        await asyncio.sleep(max(0.0, 7.0 / 20 - (time.monotonic() - started)))
    assert len(openclaw.requests) == 10 and call.state == "accepted"


@pytest.mark.parametrize("today, expected, code", [
    (date(2027, 1, 19), "WARN  REALTIME_MODEL=gpt-realtime will be shut down by OpenAI on 2027-01-20: "
                        "set REALTIME_MODEL=gpt-realtime-2.1 before then", 0),
    (date(2027, 1, 20), "FAIL  no setting makes every call fail (ALLOWED_CALLERS, REALTIME_MODEL's shutdown date)\n"
                        "      REALTIME_MODEL=gpt-realtime was shut down by OpenAI on 2027-01-20", 1),
])
async def test_check_shows_the_shutdown_date_of_openais_model_object(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, capsys: pytest.CaptureFixture[str], today: date, expected: str, code: int
) -> None:
    config = config_from(make_env(openai, openclaw, REALTIME_MODEL="gpt-realtime"))
    assert await voicebridge.check(config, today=today) == code
    output = capsys.readouterr().out
    assert expected in output, output
    assert ("All good" in output) == (code == 0) and openai.models_retrieved == ["gpt-realtime"] and openai.rest == []
    assert not hasattr(voicebridge, "RETIRING_MODELS")  # the dates are OpenAI's, not a table to keep by hand


async def test_the_service_asks_openai_for_its_models_shutdown_date_in_the_background(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    running = await bridges(state_env(openai, openclaw, tmp_path / "a", REALTIME_MODEL="gpt-realtime-mini"))
    await running.logged("WARNING REALTIME_MODEL=gpt-realtime-mini will be shut down by OpenAI on 2027-01-20: "
                         "set REALTIME_MODEL=gpt-realtime-2.1-mini before then")
    openai.model_delay = 30  # OpenAI out of reach: the port opens all the same
    started = time.monotonic()
    slow = await bridges(state_env(openai, openclaw, tmp_path / "b", REALTIME_MODEL="gpt-realtime-mini"))
    assert time.monotonic() - started < 10 and "shut down" not in slow.log
    code, output = await slow.stop()
    assert code == 0 and "WARNING" not in output and "ERROR" not in output, output


# --- systemd and the owner know the truth (issue 25) -------------------------------------------------------------------


class Systemd:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET: what the service tells it, and when it came (a
    thread reads it, so the times are right even while the test's own event loop is stuck)."""

    def __init__(self, tmp_path: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.address = f"@voicebridge-test-{os.getpid()}-{id(self)}" if abstract else str(tmp_path / "notify")
        self.sock.bind("\0" + self.address[1:] if abstract else self.address)
        self.sock.settimeout(0.1)
        self.heard: list[tuple[float, str]] = []
        self.reading = True
        self.thread = threading.Thread(target=self.listen, daemon=True)
        self.thread.start()

    def listen(self) -> None:
        while self.reading:
            with contextlib.suppress(TimeoutError, socket.timeout):
                message = self.sock.recv(4096).decode()
                self.heard.append((time.monotonic(), message))

    def read(self) -> list[str]:
        return [message for _, message in self.heard]

    def close(self) -> None:
        self.reading = False
        self.thread.join()
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_systemd_hears_ready_once_the_port_answers_then_the_watchdog_then_stopping(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, tmp_path: Path, abstract: bool
) -> None:
    systemd, port = Systemd(tmp_path, abstract), free_port()
    env = {**make_env(openai, openclaw), "PORT": str(port), "NOTIFY_SOCKET": systemd.address,
           "WATCHDOG_USEC": "400000"}  # WatchdogSec=0.4: a ping every 0.2 s
    proc = await run_voicebridge(env)
    await eventually(lambda: any("READY=1" in m for m in systemd.read()), timeout=20)
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
        assert resp.status == 200  # READY=1 came once the port answers, not before
    await asyncio.sleep(1.0)
    pings = [at for at, message in systemd.heard if "WATCHDOG=1" in message]
    assert 4 <= len(pings) <= 8, systemd.heard  # every half of WATCHDOG_USEC
    assert any("STATUS=0 live call(s)" in m for m in systemd.read())
    proc.send_signal(signal.SIGTERM)
    code, output = await output_of(proc)
    await eventually(lambda: any("STOPPING=1" in m for m in systemd.read()))
    systemd.close()
    assert code == 0, output


async def test_a_stuck_event_loop_stops_the_watchdog_pings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    systemd = Systemd(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    app = web.Application()
    app[voicebridge.CALLS] = {}
    task = asyncio.create_task(voicebridge.tell_systemd(app))
    await asyncio.sleep(0.5)
    time.sleep(1.0)  # a blocking call wedges the loop
    blocked_at = time.monotonic()
    await asyncio.sleep(0.35)
    task.cancel()
    systemd.close()
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(systemd.heard)]
    assert systemd.heard[0][1] == "READY=1" and max(gaps) >= 0.9  # nothing while it was stuck
    assert any(at >= blocked_at for at, m in systemd.heard if "WATCHDOG=1" in m)  # and pings again after
    monkeypatch.delenv("NOTIFY_SOCKET")
    voicebridge.notify("READY=1")  # without NOTIFY_SOCKET: nothing, and no error


def test_the_unit_waits_for_ready_and_has_a_watchdog() -> None:
    unit = (HERE / "voicebridge.service").read_text()
    assert "\nType=notify\n" in unit and re.search(r"\nWatchdogSec=\d+", unit)


async def test_check_sends_a_signed_test_event_through_the_public_path(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    env = state_env(openai, openclaw, tmp_path / "state")
    running = await bridges(env)
    url = f"http://127.0.0.1:{running.port}/webhook"
    code, output = await output_of(await run_voicebridge({**env, "WEBHOOK_URL": url}, "--check"))
    assert code == 0 and f"ok    a signed test event reaches the service at WEBHOOK_URL={url}" in output, output
    await running.logged("webhook verified: voicebridge.check, ignored")
    assert openai.rest == [] and history_rows(str(tmp_path / "state")) == {}  # no call control, no call recorded
    other = "whsec_" + base64.b64encode(b"the-secret-edited-in-the-file-32").decode()
    code, output = await output_of(await run_voicebridge({**env, "WEBHOOK_URL": url, "OPENAI_WEBHOOK_SECRET": other},
                                                         "--check"))
    assert code == 1 and "FAIL  a signed test event" in output and "OPENAI_WEBHOOK_SECRET" in output.split(
        "FAIL  a signed test event")[1].split("\n")[1], output
    closed = f"http://127.0.0.1:{free_port()}/webhook"
    code, output = await output_of(await run_voicebridge({**env, "WEBHOOK_URL": closed}, "--check"))
    problem = output.split("FAIL  a signed test event")[1].split("\n")[1]
    assert code == 1 and "check WEBHOOK_URL" in problem and "cannot connect" in problem, output
    code, output = await output_of(await run_voicebridge(env, "--check"))
    assert "WARN  no WEBHOOK_URL: the public path" in output and "test event" not in output


async def test_check_fails_on_a_state_dir_this_user_cannot_make(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("not a folder\n")
    env = make_env(openai, openclaw, STATE_DIR=str(tmp_path / "file" / "state"))
    code, output = await output_of(await run_voicebridge(env, "--check"))
    assert code == 1 and f"FAIL  STATE_DIR={tmp_path}/file/state can be made and written" in output, output
    assert "All good" not in output
    code, output = await output_of(await run_voicebridge({**env, "STATE_DIR": str(tmp_path / "new")}, "--check"))
    assert code == 0 and f"ok    STATE_DIR={tmp_path}/new can be made and written" in output, output


async def test_an_unreadable_settings_file_is_one_fail_in_check(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, tmp_path: Path
) -> None:
    code, output = await output_of(await run_voicebridge({}, "--env-file", str(tmp_path / "missing.env"), "--check"))
    assert code == 78 and output.splitlines() == ["FAIL  the settings file can be read",
                                                  f"      --env-file {tmp_path}/missing.env: there is no such file"]
    (tmp_path / "binary.env").write_bytes(b"\xff\xfe\x00junk")
    code, output = await output_of(await run_voicebridge({}, "--env-file", str(tmp_path / "binary.env"), "--check"))
    assert code == 78 and output.count("FAIL") == 1 and "ok " not in output and "OPENCLAW_TOKEN" not in output


async def test_the_first_error_names_the_settings_file_to_fill_in(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "voicebridge.py").write_text((HERE / "voicebridge.py").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OPENCLAW_"))}
    result = subprocess.run([sys.executable, str(tmp_path / "app" / "voicebridge.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30)
    first = result.stderr.splitlines()[0]
    assert result.returncode == 78 and "OPENAI_API_KEY is not set" in first, result.stderr
    assert f"{tmp_path}/app/.env (copy .env.example there first)" in first


async def test_calls_takes_a_unique_start_of_a_call_id(
    start_bridge: Bridge, openai: FakeOpenAI, tmp_path: Path
) -> None:
    state_dir = str(tmp_path / "state")
    bridge = await start_bridge(STATE_DIR=state_dir)
    for call_id in ("rtc_479a275623b5", "rtc_479b000000aa"):
        call = await connected_call(bridge, openai, call_id)
        await call.caller_hangs_up()
    await eventually(lambda: len(history_rows(state_dir)) == 2)
    code, out, err = await calls_cli(state_dir, "rtc_479a")  # as the log shows it, cut short
    assert code == 0 and "call rtc_479a275623b5 from" in out, out + err
    code, out, err = await calls_cli(state_dir, "rtc_479")
    assert code == 1 and "rtc_479a275623b5" in err and "rtc_479b000000aa" in err and out == "", out + err
    code, out, err = await calls_cli(state_dir, "rtc_479a", "--json")
    assert code == 0 and json.loads(out)["call_id"] == "rtc_479a275623b5"


async def test_each_distinct_rejection_reason_is_logged_within_the_second(
    bridge: Any, caplog: pytest.LogCaptureFixture
) -> None:
    body = incoming_event("rtc_flood")
    for _ in range(20):
        await post_webhook(bridge, body, headers={})  # no signature headers at all
    await post_webhook(bridge, body, headers=sign(body, secret="whsec_" + base64.b64encode(b"x" * 32).decode()))
    lines = [r.getMessage() for r in caplog.records if "webhook rejected" in r.getMessage()]
    assert len(lines) == 2 and "missing webhook-id" in lines[0] and "no webhook-signature matches" in lines[1], lines


async def test_check_says_ok_or_warn_of_the_pin(openai: FakeOpenAI, openclaw: FakeOpenClaw,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert await voicebridge.check(config_from(make_env(openai, openclaw))) == 0
    assert any(line.startswith("WARN  no CALL_PIN: a caller ID, which can be faked,")
               for line in capsys.readouterr().out.splitlines())
    assert await voicebridge.check(config_from(make_env(openai, openclaw, CALL_PIN="246810"))) == 0
    assert "ok    CALL_PIN is set (6 digits)" in capsys.readouterr().out.splitlines()
