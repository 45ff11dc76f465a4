"""voicebridge: phone your own OpenClaw assistant through OpenAI's Realtime API over SIP.

The call path, which this file follows (the audio never touches this process: it only steers the call):
  1. OpenAI posts a signed realtime.call.incoming webhook to POST /webhook: verify it, screen the caller ID.
  2. POST /v1/realtime/calls/{call_id}/accept with the session config (or /reject with a SIP status).
  3. Only after the accept answered 200, open the call's control WebSocket, the "sideband":
     wss://.../v1/realtime?call_id={call_id}   (never ?model=, which opens a new, empty session).
  4. When a completed response holds an ask_openclaw call, ask OpenClaw: POST {OPENCLAW_URL}/v1/chat/completions.
  5. Hand the answer back as a function_call_output item, then response.create: the model speaks it.
  However it ends, the call ends with POST /v1/realtime/calls/{call_id}/hangup.

Run it:  cp .env.example .env  (every setting is explained there), then  python voicebridge.py  [--env-file FILE]
         python voicebridge.py --check | --ask "QUESTION" | --calls [CALL_ID]     (--help says what each does)
Step by step, with where each step lives in this file: docs/protocol.md. Exit status 78: a configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import fcntl
import functools
import gc
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import pwd
import re
import signal
import socket
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import WSMsgType, web
from dotenv.parser import parse_stream

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # Python 3.10: the backport in requirements.txt (it raises asyncio.TimeoutError)
    from async_timeout import timeout

log = logging.getLogger("voicebridge")

# --- The protocol at a glance: every URL and message voicebridge sends OpenAI ---

def bearer(key: str) -> dict[str, str]:
    """The header of every request to OpenAI (never OpenAI-Beta: that API is gone) and OpenClaw."""
    return {"Authorization": f"Bearer {key}"} if key else {}  # (an OpenClaw gateway may have no token)


def call_control_url(config: Config, call_id: str, action: str) -> str:
    """Step 2 and the end: POST .../accept (accept_payload), .../reject ({"status_code": 603}, 486), .../hangup."""
    return f"{config.openai_base_url}/realtime/calls/{call_id}/{action}"


def sideband_url(config: Config, call_id: str) -> str:
    """Step 3: the call's control WebSocket: https://.../v1 gives wss://.../v1/realtime?call_id=..."""
    return re.sub(r"^http", "ws", config.openai_base_url) + f"/realtime?call_id={call_id}"


ASK_OPENCLAW_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "ask_openclaw",
    "description": ("Ask the owner's personal assistant, which can read and act on their email, calendar, files, "
                    "messages and the web. Before calling, tell the caller briefly that you are checking; the "
                    "answer can take 5 to 30 seconds."),
    "parameters": {"type": "object", "required": ["request"], "properties": {
        "request": {"type": "string", "description": "The caller's request, complete and self-contained."}}},
}

END_CALL_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "end_call",
    "description": "Hang up the phone. Say goodbye first; call this only when the caller is finished.",
    "parameters": {"type": "object", "properties": {}},
}


def accept_payload(config: Config) -> dict[str, Any]:
    """Step 2's body: the session config. No audio format: SIP negotiates the codec."""
    audio: dict[str, Any] = {"output": {"voice": config.voice}}
    if config.log_transcripts:
        audio["input"] = {"transcription": {"model": TRANSCRIPTION_MODEL}}
    session = {
        "type": "realtime",  # required: without it the accept answers 200 and the sideband then 404s
        "model": config.model,
        "instructions": (config.instructions or INSTRUCTIONS) + (PIN_INSTRUCTIONS if config.call_pin else ""),
        "audio": audio,
        "tools": [ASK_OPENCLAW_TOOL, END_CALL_TOOL],
        "tool_choice": "auto",
    }
    if config.reasoning_effort and takes_reasoning(config.model):
        session["reasoning"] = {"effort": config.reasoning_effort}
    return session


def takes_reasoning(model: str) -> bool:
    """Whether the model reasons and takes `reasoning` (the gpt-realtime-2 family, bar its mini)."""
    return model.startswith("gpt-realtime-2") and "mini" not in model


# On the sideband, function calls run only from a completed response.done (a barge-in cancels them).
# Each client event carries an event_id, so that an `error` event can point back at it.


def function_call_output(call_id: str, output: str) -> dict[str, Any]:
    """Step 5: a tool's answer to the model's function call `call_id`, as a conversation item."""
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def response_create(response: dict[str, Any] | None, event_id: str) -> dict[str, Any]:
    """Step 5: make the model speak (after an output: the answer); see Sideband for when."""
    return {"type": "response.create", "event_id": event_id, **({"response": response} if response else {})}

# --- The webhook: where a call starts ---

async def webhook(request: web.Request) -> web.Response:
    """Step 1: verify, deduplicate, screen the caller, then accept (or reject) in the background."""
    app, received = request.app, time.monotonic()
    try:
        async with timeout(BODY_TIMEOUT):
            body = await request.read()
    except asyncio.TimeoutError:
        app[REJECTED].warning(f"webhook rejected: the body did not arrive within {BODY_TIMEOUT:g}s")
        return web.Response(status=408, text=f"the body did not arrive within {BODY_TIMEOUT:g}s\n")
    except ConnectionError:  # the client went away: routine
        log.debug("webhook client disconnected before its body arrived")
        return web.Response(status=400)
    try:
        verify_signature(app[CONFIG].webhook_key, request.headers, body)
    except SignatureError as exc:
        app[REJECTED].warning(f"webhook rejected: {exc}")
        return web.Response(status=400, text=f"invalid webhook signature: {exc}\n")
    event = json_object(body)
    if event is not None and event.get("type") != "realtime.call.incoming":  # a 2xx, or it comes again for days
        log.info("webhook verified: %s, ignored", one_line(event.get("type")))
        return web.Response(text="ignored\n")
    data = (event or {}).get("data")
    if not isinstance(data, dict) or "call_id" not in data:
        app[REJECTED].warning("webhook rejected: signed, but not a JSON event with data.call_id")
        return web.Response(status=400, text="body is not a realtime.call.incoming event\n")
    call_id = data["call_id"]
    if not isinstance(call_id, str) or not CALL_ID.fullmatch(call_id):
        log.warning("webhook verified, but its call_id is malformed, ignored")
        return web.Response(text="ignored\n")
    if not first_time(app[SEEN_CALLS], call_id):  # a retried delivery, or a replay: a call is owned once
        log.info("[%s] call already handled, duplicate delivery ignored", call_id)
        return web.Response(text="duplicate\n")
    app[STORE].seen(call_id)

    config, user = app[CONFIG], from_user(data.get("sip_headers"))
    caller, who = normalise_number(user), describe_caller(user)
    agent = agent_for(config, caller)
    away, why, status = turned_away(app, agent)
    if not away and agent is not None:
        log.info("[%s] webhook verified, caller %s allowed, agent %s", call_id, who, agent)
        call = app[CALLS][call_id] = Call(app, call_id, caller, agent, received)
        call.task = spawn(app[TASKS], call_id, call.run())
        return web.Response(text="ok\n")
    log.warning("[%s] rejecting the call from %s with SIP %d: %s", call_id, who, status, why)
    app[STORE].save_history(history_record(call_id, caller, agent, time.time(), turned_away=away,
                                           timeline=[(0.0, f"turned away with SIP {status}: {why}")]))
    spawn(app[TASKS], call_id, call_control(app[HTTP], config, call_id, "reject", {"status_code": status}))
    return web.Response(text="ok\n")

# --- One call, in the order it goes: accept, attach, events, tools, output + response.create, hang up ---

class Call:
    """One call, from its webhook (or a restart) to its hangup."""

    def __init__(self, app: web.Application, call_id: str, caller: str | None, agent: str, received: float,
                 accepted_at: float | None = None) -> None:
        self.app = app
        self.config = app[CONFIG]
        self.http = app[HTTP]
        self.id = call_id
        self.caller = caller
        self.agent = agent
        self.resumed = accepted_at is not None  # left live by a crashed run
        self.accepted_at = time.time() if accepted_at is None else accepted_at  # wall clock, kept in the store
        self.log = CallLog(call_id)
        self.task: asyncio.Task[None] | None = None
        self.sideband = Sideband(self.log)
        self.keypad = Keypad(self.config.call_pin)
        self.silence = SilenceClock(self.config.idle_seconds, received)
        self.record = CallRecord(received, self.resumed)
        self.tools: set[asyncio.Task[None]] = set()
        self.in_flight: tuple[str, ...] = ()  # function calls whose output is not confirmed yet
        self.playback_stopped = asyncio.Event()  # clear from output_audio_buffer.started to .stopped
        self.playback_stopped.set()
        self.playing: Any = None  # the response_id of the latest output_audio_buffer.started
        self.prompted = False  # the model has spoken (and so asked for the PIN, if one is needed)
        self.accepted = self.resumed  # (or may be): a /hangup is owed
        self.reconnects: list[float] = []  # for the reconnect budget
        self.asking = False  # a question is with OpenClaw
        self.breaker = ToolBreaker()
        self.end_reason = ""  # why it ended (docs/history.md)

    async def run(self) -> None:
        """The call's life: accept it (or resume it), attach, follow it to its end."""
        accepting = False  # the accept is out: cut off now, it may still take effect
        try:
            async with timeout(self.config.max_call_seconds - max(0.0, time.time() - self.accepted_at)):
                if self.resumed:  # a 404 now: the call ended while no process watched
                    if not self.end_reason:  # (past MAX_CALL_SECONDS, or no longer listed: only hung up)
                        await self._attach_and_listen(RECONNECT_DELAYS)
                    return
                self.app[STORE].save_call(self)
                await self.app[STORE].written()  # so that a crash from now on finds it
                accepting, accept = True, accept_payload(self.config)
                self.record.mark("accept sent")
                status, uncertain = await call_control(self.http, self.config, self.id, "accept", accept)
                accepting = False
                self.record.mark("accepted" if status == 200 else f"accept answered: HTTP {status}")
                if status != 200 and not uncertain:
                    self.end_reason = self.end_reason or ("caller_hung_up" if status == 404 else "error")
                    return
                self.accepted = True  # or may be: a retry after a timeout gets 404 or 409
                if self.end_reason:
                    return  # ended while the accept was out: hung up, never greeted
                if status == 200:
                    self.log.info("call accepted in %.0f ms", (time.monotonic() - self.record.received) * 1000)
                    return await self._attach_and_listen(SIDEBAND_RETRY_DELAYS)
                self.log.warning("accept's outcome is unknown (HTTP %s after a failed try): trying the sideband once",
                                 status)
                await self._attach_and_listen(())
        except asyncio.TimeoutError:
            self.log.info("call reached MAX_CALL_SECONDS=%g", self.config.max_call_seconds)
            await self.hang_up("max_duration")
        except asyncio.CancelledError:
            self.end_reason = self.end_reason or "shutdown"
            raise
        finally:
            await self._end(accepting)

    async def _connect_sideband(self, delays: tuple[float, ...]) -> aiohttp.ClientWebSocketResponse | None:
        """Open ?call_id=, retrying after `delays`; None once the call is over or out of reach."""
        race = self.sideband.ws is None and not self.resumed  # right after the accept, 404 may be a race
        for delay in (*delays, None):
            try:
                async with timeout(HANDSHAKE_TIMEOUT):
                    return await self.http.ws_connect(
                        sideband_url(self.config, self.id), headers=bearer(self.config.openai_api_key),
                        heartbeat=SIDEBAND_HEARTBEAT, timeout=aiohttp.ClientWSTimeout(ws_close=5))
            except aiohttp.WSServerHandshakeError as exc:
                why = f"HTTP {exc.status}"  # the status alone: a real 404 can have no body
                if exc.status in (404, 410) and not race:
                    self.log.info("sideband refused (%s): the call is over", why)
                    self.end_reason = self.end_reason or "caller_hung_up"
                    return None
                if 400 <= exc.status < 500 and exc.status not in (404, 429):
                    self.log.error("sideband refused (%s)%s", why, " (check OPENAI_API_KEY)" * (exc.status == 401))
                    return None
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                why = exc_text(exc)
            if delay is None or self.end_reason:
                self.log.error("sideband unavailable, giving up: %s", why)
                return None
            self.log.debug("sideband not ready (%s), retrying in %.2fs", why, delay)
            await asyncio.sleep(delay)
        return None

    async def _attach_and_listen(self, delays: tuple[float, ...] | None) -> None:
        """Step 3 on: open the sideband, greet, read its events, and after a close see if the call goes on."""
        while delays is not None and (ws := await self._connect_sideband(delays)) is not None:
            again = self.sideband.ws is not None
            self.log.log(logging.WARNING if again else logging.INFO, "sideband %s",
                         "reconnected: the call goes on" if again else "connected")
            self.record.mark("sideband reconnected" if again else "sideband open")
            await self.sideband.attach(ws, again=again or self.resumed)
            if not again:
                await self._begin()
            msg = await ws.receive()
            while msg.type not in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                if msg.type == WSMsgType.TEXT:
                    await self._on_message(msg.data)
                msg = await ws.receive()
            reason = one_line(msg.extra, 200) if msg.type == WSMsgType.CLOSE and msg.extra else ""
            delays = await self._after_close(None if ws.close_code is None else int(ws.close_code), reason)
        self.end_reason = self.end_reason or "sideband_lost"

    async def _on_message(self, data: str) -> None:
        """Step 4: one sideband event; anything malformed is logged and skipped."""
        event = json_object(data)
        if event is None:
            self.log.warning("sideband sent something other than a JSON object, ignored")
            return
        kind = event.get("type")
        rule = await self.sideband.on_event(kind, event)
        if rule == "resent":
            self.record.mark("refused for its reasoning: asked for again without it")
        item: dict[str, Any] = event["item"] if isinstance(event.get("item"), dict) else {}
        response: dict[str, Any] = event["response"] if isinstance(event.get("response"), dict) else {}
        now = time.monotonic()
        caller_item = kind == "conversation.item.added" and item.get("role") == "user"
        if rule == "unasked" or kind in CALLER_SIGNS or caller_item:
            self.silence.caller(now, speaking=kind == "input_audio_buffer.speech_started")
        elif kind in ("response.done", "output_audio_buffer.stopped", "output_audio_buffer.cleared"):
            self.silence.heard(now)
        if kind == "response.done":
            self.prompted = True
            self.record.add_usage(response.get("usage"))
            await self._on_response_done(response)
        elif kind == "response.created" and response.get("metadata") == GREETING_TAG:
            self.record.greeting_id = response.get("id")
            self.record.mark("greeting started")
        elif kind == "conversation.item.added" and item.get("call_id") in self.in_flight:
            self.in_flight = tuple(i for i in self.in_flight if i != item["call_id"])
            self.app[STORE].save_call(self)
        elif kind == "output_audio_buffer.started":
            self.playing = event.get("response_id")
            self.playback_stopped.clear()
            self.record.audio_started(self.playing)
        elif kind == "output_audio_buffer.cleared" or (  # .cleared: the caller barged in
            kind == "output_audio_buffer.stopped" and event.get("response_id") in (None, self.playing)
        ):  # (an earlier response's audio ending as a later one plays is not silence)
            self.playback_stopped.set()
        elif kind in SPEAKERS and self.config.log_transcripts:
            self.log.info("%s", self.record.said(SPEAKERS[kind], one_line(event.get("transcript"))))
        elif kind == "conversation.item.input_audio_transcription.failed":
            self.log.debug("transcription failed: %s", one_line(json.dumps(event.get("error"))))
        elif kind == "input_audio_buffer.dtmf_event_received":
            await self._on_keypad(event.get("event"))

    async def _on_response_done(self, response: dict[str, Any]) -> None:
        """Run the function calls of a completed response, never of one the caller interrupted."""
        status = response.get("status")
        if status in ("failed", "incomplete"):
            self.log.warning("response %s: %s", status, json.dumps(response.get("status_details"))[:500])
        output = response.get("output")
        calls = [item for item in (output if isinstance(output, list) else [])
                 if isinstance(item, dict) and item.get("type") == "function_call"]
        names = one_line(", ".join(str(item.get("name")) for item in calls))
        if status == "completed" and calls:
            self.log.info("function call %s: its response completed, running it now", names)
            self._start(self._run_calls(calls))
        elif calls:
            self.log.info("function call %s not run: its response was %s", names, one_line(status))

    async def _run_calls(self, items: list[dict[str, Any]]) -> None:
        """Run the function calls of one response in the order the model made them."""
        asked = [item["call_id"] for item in items if item.get("name") != "end_call" and item.get("call_id")]
        self.in_flight += tuple(call_id for call_id in asked if isinstance(call_id, str))
        self.app[STORE].save_call(self)  # first: a restart tells the model of each, never runs one again
        for item in items:
            if item.get("name") == "end_call":
                self.log.info("end_call: hanging up after the goodbye")
                await self.hang_up_after_goodbye("end_call")
            elif not isinstance(item.get("call_id"), str) or not item["call_id"]:
                self.log.warning("function call %s has no call_id, ignored", one_line(item.get("name")))
            else:
                self.record.tool_calls += 1
                loop = self.breaker.count(time.monotonic())
                if loop:
                    then = ": telling the model to stop" if loop == "stop" else ", after being told to stop: hanging up"
                    self.log.warning("%d tool calls within %gs%s", len(self.breaker.calls), LOOP_WINDOW, then)
                if loop == "hang up":
                    return await self.hang_up_after_goodbye("tool_loop", goodbye=LOOP_GOODBYE)
                output = STOP_TOOLS if loop else await self._tool_output(item.get("name"), item.get("arguments"))
                await self.sideband.queue(function_call_output(item["call_id"], output))  # + response.create: flush()

    async def _tool_output(self, name: Any, arguments: Any) -> str:
        """The output for one function call; errors are outputs the model can act on."""
        if name != "ask_openclaw":
            self.log.warning("unknown tool %s called", one_line(repr(name), 100))
            return f"Error: there is no tool named {one_line(repr(name), 100)}. Use ask_openclaw or end_call."
        if not self.keypad.ok:
            self.log.info("ask_openclaw before the PIN was entered: not sent")
            return PIN_NEEDED
        if self.end_reason:
            self.log.info("ask_openclaw while the call is ending: not sent")
            return "Not sent: the call is ending."
        fits = isinstance(arguments, str) and len(arguments) <= MAX_REQUEST_CHARS + 100
        request = (json_object(arguments) or {}).get("request") if fits else None
        if not isinstance(request, str) or not request.strip():
            self.log.warning('ask_openclaw arguments missing, invalid or too long, not sent: need {"request": "..."}')
            return 'Error: call ask_openclaw with JSON arguments {"request": "<the question in one or two sentences>"}.'
        request = request.strip()
        earlier = self.breaker.repeat(request, time.monotonic())
        if earlier:
            self.log.info("ask_openclaw: the same question again within %gs, answered from before", REPEAT_WINDOW)
            return f"{earlier} (This answered the same question a moment ago: it was not asked again.)"
        if self.asking:
            self.log.info("ask_openclaw while the previous question is still running: not sent")
            return "The previous question is still being worked on. Wait for that answer before asking again."
        self.asking = True
        filler = asyncio.create_task(self._filler())
        question = self.record.ask()
        try:
            answer = await ask_openclaw(self.http, self.config, request, agent=self.agent,
                                        user=openclaw_user(self.caller, self.id), system=openclaw_system(self.caller))
            question["outcome"] = "answered"
            self.breaker.last = (request, time.monotonic(), answer)
        except OpenClawError as exc:
            self.log.warning("OpenClaw failed: %s", exc)
            question.update(outcome="too slow" if exc.say == SAY_TOO_SLOW else "failed", why=str(exc))
            return exc.say
        finally:
            self.asking = False
            self.silence.heard(time.monotonic())
            self.record.settle(question)
            filler.cancel()
        self.log.info("OpenClaw answered in %.1fs", question["seconds"])
        return answer

    async def hang_up_after_goodbye(self, reason: str, goodbye: str = "") -> None:
        """Let what is said play out (bounded), then hang up; `goodbye`: ask for it first."""
        self.end_reason = self.end_reason or reason
        try:
            async with timeout(GOODBYE_TIMEOUT):
                if self.sideband.ws is not None and not self.sideband.ws.closed:
                    # Owed: it goes now, or after the active response, ahead of results. Then wait
                    # until it, and an answer asked for in the same breath as end_call, are done.
                    if goodbye:
                        self.playback_stopped.clear()
                        await self.sideband.owe({"instructions": goodbye, "tool_choice": "none",
                                                 "metadata": GOODBYE_TAG})
                    await self.sideband.wait_idle(settled=True)
                await self.playback_stopped.wait()
        except asyncio.TimeoutError:
            self.log.info("goodbye still playing after %.0fs, hanging up anyway", GOODBYE_TIMEOUT)
        await self.hang_up(reason)

    async def hang_up(self, reason: str) -> None:
        """End the call over REST (retried: an open call is billed); run() cleans up."""
        self.end_reason = self.end_reason or reason
        if not self.accepted:  # hung up already, or the accept is out (run() hangs up once it answers)
            return
        self.accepted = False
        await call_control(self.http, self.config, self.id, "hangup", delays=HANGUP_RETRY_DELAYS)
        await self.sideband.close()

    # The rest of the call: its end, reconnects, the greeting, the PIN, the filler, the silence.

    async def _end(self, accepting: bool) -> None:
        """However it ended: count a missing PIN, hang up, record the call, stop its tools."""
        # Bookkeeping first: shutdown may cancel this task again while it awaits below.
        self.app[CALLS].pop(self.id, None)
        self.accepted = self.accepted or accepting
        silent = self.keypad.waiting and self.prompted  # asked for the PIN, which never came
        if silent and self.end_reason not in ("shutdown", "sideband_lost", "pin_locked", ""):
            self.log.warning("the call ended (%s) without the PIN: counts as a wrong PIN", self.end_reason)
            self._wrong_pin()  # so silent callers risk a strike too
        if self.silence.timer is not None:
            self.silence.timer.cancel()
        try:
            if self.accepted:  # whatever happened: a 404 answer means it was over already
                await self.hang_up(self.end_reason or "error")
        finally:
            self.app[STORE].end_call(self.id)
            pad = self.keypad
            pin = "accepted" if pad.ok else f"wrong {pad.failures} time(s)" if pad.failures else "not typed"
            record = self.record.close(self.id, self.caller, self.agent, self.accepted_at, self.end_reason or "error",
                                       pin if self.config.call_pin else None)
            self.app[STORE].save_history(record)
            answers = [question["seconds"] for question in record["questions"] if question["outcome"] == "answered"]
            self.log.info(
                "call summary: caller=%s agent=%s duration=%.1fs tool_calls=%d openclaw_seconds=%s reason=%s",
                mask(self.caller), self.agent, record["seconds"], self.record.tool_calls,
                ",".join(f"{s:.1f}" for s in answers) or "-", record["end_reason"],
            )
            for task in self.tools:
                task.cancel()  # (closing a request to OpenClaw stops its agent run)
            await asyncio.gather(*self.tools, return_exceptions=True)
            await self.sideband.close()

    async def _after_close(self, code: int | None, reason: str) -> tuple[float, ...] | None:
        """The sideband closed: the delays to reconnect with, or None (over, or given up)."""
        self.sideband.response_active = True  # nothing can be sent until a reconnect
        self.playback_stopped.set()  # (its output_audio_buffer.stopped will never come)
        self.silence.speaking_since = None  # (nor the caller's next sign)
        self.log.info("sideband closed (code %s%s)", code, f", reason {reason!r}" if reason else "")
        self.record.mark(f"sideband closed (code {code})")
        if self.end_reason:
            return None
        if code == 1001 and MAX_DURATION_CLOSE in reason.lower():
            self.end_reason = "max_duration"
            return None
        now = time.monotonic()
        self.reconnects = [at for at in self.reconnects if now - at < RECONNECT_WINDOW]
        if code == 1008 or (code or 0) >= 4000:  # (4000: beta_api_shape_disabled)
            self.log.error("sideband closed with code %s: the server refuses this session, not reconnecting", code)
        elif len(self.reconnects) == len(RECONNECT_BACKOFF):
            self.log.error("sideband dropped (code %s) after %d reconnects within %gs: giving up",
                           code, len(self.reconnects), RECONNECT_WINDOW)
        else:  # a drop, or a clean close (a backend rotating sends one too): a handshake tells
            backoff = RECONNECT_BACKOFF[len(self.reconnects)]
            self.reconnects.append(now)
            self.log.info("sideband: checking whether the call goes on%s", f" in {backoff:g}s" * bool(backoff))
            await asyncio.sleep(backoff)
            return RECONNECT_DELAYS
        self.end_reason = "sideband_lost"
        return None

    async def _begin(self) -> None:
        """After the first attach: greet, or tell the model of questions a restart cut off."""
        self.silence.heard(time.monotonic())  # (after a restart, the time down is not silence)
        if self.resumed:
            self.log.info("resumed after a restart")
            for call_id in self.in_flight:
                await self.sideband.queue(function_call_output(call_id, RESTARTED))
        else:
            greeting: dict[str, Any] = {"instructions": self.config.greeting or GREETING, "metadata": GREETING_TAG}
            if takes_reasoning(self.config.model):  # a greeting needs no thought: a sooner first word
                greeting["reasoning"] = {"effort": "minimal"}
            self.record.mark("greeting asked for" + (" at minimal reasoning" if "reasoning" in greeting else ""))
            await self.sideband.request_response(greeting)
        if self.keypad.waiting and self.app[PIN_LOCK].locked:
            self._start(self.hang_up_after_goodbye("pin_locked", goodbye=PIN_LOCKED_GOODBYE))
        elif self.keypad.waiting:
            self._start(self._pin_deadline())
        if self.config.idle_seconds:
            self._check_silence()

    async def _on_keypad(self, key: Any) -> None:
        """A key: a note for the model, a strike toward the PIN lock, or the goodbye."""
        if self.app[PIN_LOCK].locked:
            return  # no PIN is checked while the line is locked
        outcome = self.keypad.press(key, time.monotonic())
        if outcome == "accepted":
            self.record.mark("PIN accepted")
            self.log.info("PIN accepted")
            self.app[STORE].save_call(self)  # so a restart does not ask again
            await self._tell_model(PIN_ACCEPTED)
        elif outcome:
            wrong = f"wrong PIN ({self.keypad.failures} of {PIN_TRIES})"
            self.record.mark(wrong)
            self.log.warning("%s", wrong)
            self._wrong_pin()
            if outcome == "out of tries":
                self._start(self.hang_up_after_goodbye("pin_failed", goodbye=PIN_GOODBYE))
            elif not self.app[PIN_LOCK].locked:  # (else this strike locked the line: its goodbye is on its way)
                await self._tell_model(PIN_WRONG)

    def _wrong_pin(self) -> None:
        """Count a wrong PIN across calls; if that locks the line, hang up the calls waiting for one."""
        lock = self.app[PIN_LOCK]
        if lock.locked:
            return
        locked = lock.wrong_pin(time.time())
        self.app[STORE].save_lock(self.id, lock)
        if not locked:
            return
        self.log.error("%d wrong PINs within %gs, across calls: new calls are turned away until %s",
                       PIN_LOCK_AFTER, PIN_LOCK_WINDOW, utc_text(lock.until))
        for call in self.app[CALLS].values():
            if call.keypad.waiting and not call.end_reason:
                call._start(call.hang_up_after_goodbye("pin_locked", goodbye=PIN_LOCKED_GOODBYE))

    async def _pin_deadline(self) -> None:
        """Hang up on a caller with no right PIN after PIN_TIMEOUT: a silent call is billed too."""
        await asyncio.sleep(self.config.pin_timeout)
        if self.keypad.waiting:
            self.log.warning("no right PIN within PIN_TIMEOUT=%gs: hanging up", self.config.pin_timeout)
            await self.hang_up_after_goodbye("pin_timeout", goodbye=PIN_TIMEOUT_GOODBYE)

    async def _tell_model(self, text: str) -> None:
        note = {"type": "input_text", "text": text}
        await self.sideband.queue({"type": "message", "role": "system", "content": [note]})

    def _start(self, coro: Any) -> None:
        """Run a tool in a task of its own; the call cancels it at its end."""
        spawn(self.tools, self.id, coro, crashed=lambda: self._start(self.hang_up("error")))

    async def _filler(self) -> None:
        """While OpenClaw is slow, have the model say now and then that it is still checking."""
        await asyncio.sleep(FILLER_AFTER)
        while True:
            await self.sideband.wait_idle()  # never over the model's own speech
            if self.end_reason:
                return
            self.log.info("OpenClaw is slow: asking the model to say it is still checking")
            await self.sideband.request_response({"instructions": FILLER_INSTRUCTIONS, "tool_choice": "none"})
            await asyncio.sleep(FILLER_EVERY)

    def _check_silence(self) -> None:
        """The silence clock is due: ask whether anyone is there, hang up, or look again later."""
        if self.end_reason:
            return
        busy = self.sideband.response_active or self.asking or not self.playback_stopped.is_set()
        verdict = self.silence.look(time.monotonic(), busy)
        if verdict == "ask":
            self.log.info("no sign of the caller for %gs: asking whether anyone is there", self.config.idle_seconds)
            check = {"instructions": IDLE_CHECK, "tool_choice": "none", "metadata": IDLE_TAG}
            self._start(self.sideband.request_response(check))
        elif verdict == "hang up":
            self.log.info("still no sign of the caller: hanging up")
            return self._start(self.hang_up_after_goodbye("idle", goodbye=IDLE_GOODBYE))
        # A timer, not a task: a sleeping task costs ~1.5 KiB more per call.
        due = self.silence.quiet_since + self.silence.idle
        self.silence.timer = asyncio.get_running_loop().call_at(due, self._check_silence)

# --- What the model is told, and the numbers a call runs by ---

INSTRUCTIONS = """\
You are the owner's voice assistant on a phone call. Speak naturally and briefly: one to three short
sentences at a time, no lists, no markdown, no URLs read out letter by letter. For anything about the
owner's own world (email, calendar, files, messages, reminders, notes, the web, or taking an action),
use the ask_openclaw tool, which reaches their personal assistant. Say you are checking before you call
it, and wait for its answer rather than guessing. Relay its answer in your own spoken words. If it
fails, say so plainly and offer to try again. When the caller is done, say a short goodbye, then call
end_call."""
GREETING = "Greet the caller in one short sentence and ask how you can help."
FILLER_INSTRUCTIONS = ("The owner's assistant is still working on the caller's question. In a few words, tell the "
                       "caller you are still checking and it will be a moment. Do not guess the answer.")
RESTARTED = ("The owner's assistant was restarted while working on this request, so it may or may not have been done. "
             "Tell the caller, and ask whether they want you to try again.")
IDLE_CHECK = "The line has been silent for a while. Ask briefly whether the caller is still there."
IDLE_GOODBYE = "The caller seems to have gone. Say a short goodbye in one sentence."
SHUTDOWN_GOODBYE = "The line has to close now for maintenance. Apologise briefly and say goodbye in one sentence."
PIN_INSTRUCTIONS = """
Before you can use ask_openclaw, the caller must type their PIN on the phone keypad. Ask for it after
your greeting. Never say or guess the PIN. You will be told when it has been accepted."""
PIN_NEEDED = "Not sent: the caller has not typed their PIN yet. Ask them to type it on the keypad, then try again."
PIN_ACCEPTED = "The caller typed the correct PIN. Confirm briefly and carry on with what they asked for."
PIN_WRONG = "The caller typed a wrong PIN. Ask them to type it again; star clears the entry."
PIN_GOODBYE = "The PIN was wrong three times. Say politely that you cannot help without it, and goodbye."
PIN_LOCKED_GOODBYE = "Too many wrong PINs have been typed. Say politely that you cannot help now, and goodbye."
PIN_TIMEOUT_GOODBYE = "The PIN was not typed in time. Say politely that you cannot help without it, and goodbye."
STOP_TOOLS = "Not run: too many tool calls in a row. Stop calling tools, and talk with the caller about what they need."
LOOP_GOODBYE = "Something went wrong on this line. Apologise briefly and say goodbye in one sentence."
# Metadata on our response.create, which comes back in its response.created and response.done.
GREETING_TAG = {"voicebridge": "greeting"}
GOODBYE_TAG = {"voicebridge": "goodbye"}
IDLE_TAG = {"voicebridge": "anyone there"}
# Signs of the caller, besides their own items and a response started unasked (VAD heard them).
CALLER_SIGNS = ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                "input_audio_buffer.committed", "input_audio_buffer.dtmf_event_received",
                "conversation.item.input_audio_transcription.completed")
SPEAKERS = {"conversation.item.input_audio_transcription.completed": "caller",
            "response.output_audio_transcript.done": "assistant"}
TRANSCRIPTION_MODEL = "gpt-realtime-whisper"

MAX_WEBHOOK_BYTES = 64 * 1024
BODY_TIMEOUT = 5.0  # seconds for a request's head (else closed), then its body (else 408)
CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # fullmatch: "$" lets a trailing newline through
DOUBLING = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # seconds between retries, each use a slice
REST_RETRY_DELAYS = DOUBLING[:4]  # a failed accept or reject: ~4 s (the phone is ringing)
HANGUP_RETRY_DELAYS = DOUBLING  # a call not hung up is billed until OpenAI's cap: ~16 s
SIDEBAND_RETRY_DELAYS = (*DOUBLING[:2], *[1.0] * 7)  # a 404 right after the accept: a race
RECONNECT_DELAYS = DOUBLING[:5]
RECONNECT_BACKOFF = (0.0, *DOUBLING[2:])  # before the 1st..5th reconnect in RECONNECT_WINDOW
RECONNECT_WINDOW = 60.0
MAX_DURATION_CLOSE = "maximum duration"
HANDSHAKE_TIMEOUT = 10.0  # (aiohttp's default: 300 s)
SIDEBAND_HEARTBEAT = 20.0  # a ping this often; no pong within half of it: the socket is dead
GOODBYE_TIMEOUT = 10.0
FILLER_AFTER = 4.0  # seconds of OpenClaw silence before the model says "still checking"
FILLER_EVERY = 9.0  # and then at most this often
MAX_REQUEST_CHARS = 4000
# A caller asks about once in 10 s at most; a model in a loop, several times a second (docs/protocol.md).
LOOP_CALLS = 10
LOOP_WINDOW = 60.0
REPEAT_WINDOW = 10.0
MAX_TRANSCRIPT_CHARS = 500
# A speech_started with no later sign (audio cut mid-word) holds the silence clock this long at most:
# server VAD ends a turn after half a second of silence, so a caller's next sign comes long before.
SPEAKING_HOLD = 60.0

# --- The rules, without I/O: each a small class or function you can test without a socket ---

class Sideband:
    """The sideband's sending rules: one response at a time, each item delivered once."""

    def __init__(self, log: CallLog) -> None:
        self.log = log
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.idle = asyncio.Event()
        self.outbox: list[dict[str, Any]] = []
        self.unconfirmed: dict[str, dict[str, Any]] = {}  # items sent, by id, until the server confirms them
        self.owed: dict[str, Any] | None = None  # a response.create to send once no response is active
        self.last_response: tuple[str, dict[str, Any] | None] = ("", None)  # our last response.create: id, body
        self.asked = 0  # our response.creates neither started nor refused
        self.creates: dict[str, str] = {}  # event_id of each conversation.item.create -> its item id
        # Ids unique in the conversation, which outlives a process: a random run, then a count.
        self._ids = map(f"vb{os.urandom(4).hex()}_{{}}".format, itertools.count(1))  # (lighter than a generator)

    @property
    def response_active(self) -> bool:
        """A response is under way (or the sideband is down): a response.create would fail."""
        return not self.idle.is_set()

    @response_active.setter
    def response_active(self, active: bool) -> None:
        if active:
            self.idle.clear()
        else:
            self.idle.set()

    async def attach(self, ws: aiohttp.ClientWebSocketResponse, again: bool) -> None:
        """Use a new sideband; `again`: send what may have been lost with the old one."""
        self.ws, self.asked = ws, 0
        if again:
            self.response_active = False  # (a response cut off by the drop never reports its end)
            # Items never confirmed may have died with the socket: send them again under the same
            # ids, so one that did arrive is refused as a duplicate, not added twice.
            self.outbox[:0] = self.unconfirmed.values()
            self.unconfirmed.clear()
            await self.flush()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def queue(self, item: dict[str, Any]) -> None:
        """A conversation item, then a response.create, once no response is active."""
        self.outbox.append(item)
        await self.flush()

    async def owe(self, response: dict[str, Any]) -> None:
        """Ask for this response now, or after the active one, ahead of any results."""
        self.owed = response
        await self.flush()

    async def wait_idle(self, settled: bool = False) -> None:
        """Wait until no response is active; `settled`: and nothing is owed."""
        while self.response_active or (settled and self.owed is not None):
            await self.idle.wait()

    async def on_event(self, kind: Any, event: dict[str, Any]) -> str:
        """Follow the server events the rules depend on: "unasked" (a response nobody asked for), "resent"."""
        if kind == "response.created":
            unasked = "unasked" if self.asked == 0 else ""
            self.response_active, self.asked = True, max(0, self.asked - 1)
            return unasked
        elif kind == "response.done":
            self.response_active = False
            await self.flush()
        elif kind in ("conversation.item.added", "conversation.item.created"):  # .created: the pre-GA name
            item = event.get("item")
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                self.unconfirmed.pop(item["id"], None)
        elif kind == "error":  # our response.create refused: repeated after the active one
            error = event["error"] if isinstance(event.get("error"), dict) else {}
            self.log.warning("server error %s: %s", one_line(error.get("code")), one_line(error.get("message")))
            # A refused item ("already exists" after a resend, or invalid) is settled.
            self.unconfirmed.pop(self.creates.get(str(error.get("event_id")), ""), None)
            event_id, body = self.last_response
            if event_id and error.get("event_id") == event_id:
                # We lost a race with a response the server started: repeat ours after it, unless
                # it is a greeting or "anyone there?", stale once the model has answered.
                self.response_active = error.get("code") == "conversation_already_has_active_response"
                self.asked = max(0, self.asked - 1)
                stale = (body or {}).get("metadata") in (GREETING_TAG, IDLE_TAG)
                if self.response_active and not stale and self.owed is None:
                    self.owed = body or {}
                elif not self.response_active and "reasoning" in (body or {}):  # maybe refused for it
                    await self.owe({key: value for key, value in (body or {}).items() if key != "reasoning"})
                    return "resent"
        return ""

    async def flush(self) -> None:
        """Send queued items and one response.create, only while no response is active."""
        if self.response_active or not (self.outbox or self.owed is not None):
            return  # (a dropped sideband counts as active: all waits for the reconnect)
        items, owed, self.outbox, self.owed = self.outbox, self.owed, [], None
        self.response_active = True  # claimed before the first await: a concurrent flush waits
        for item in items:
            item.setdefault("id", next(self._ids))  # ours: a repeat is refused, never added twice
            event: dict[str, Any] = {"type": "conversation.item.create", "event_id": next(self._ids), "item": item}
            self.unconfirmed[item["id"]], self.creates[event["event_id"]] = item, item["id"]
            await self._send(event)
            if "call_id" in item:
                self.log.info("result sent for %s", one_line(item["call_id"]))
        goodbye = owed is not None and owed.get("metadata") == GOODBYE_TAG
        await self.request_response(owed if goodbye or not items else None)  # results beat a filler

    async def request_response(self, response: dict[str, Any] | None = None) -> None:
        event = response_create(response, next(self._ids))
        self.response_active, self.last_response = True, (event["event_id"], response)
        self.asked += await self._send(event)

    async def _send(self, event: dict[str, Any]) -> bool:
        """Send one client event, True if it went out."""
        if self.ws is None or self.ws.closed:
            self.log.debug("sideband closed, %s not sent", event["type"])
            return False
        try:
            await self.ws.send_json(event)
        except ConnectionError as exc:
            self.log.debug("sideband closing, %s not sent (%s)", event["type"], one_line(exc))
            return False
        return True


class Keypad:
    """The caller's PIN on the keypad: press() takes a key and says what happened."""

    def __init__(self, pin: str) -> None:
        self.pin = pin
        self.ok = not pin  # the right PIN was typed (or none is needed)
        self.failures = 0
        self.entry = ""  # digits so far; never logged
        self.last_key = float("-inf")

    @property
    def waiting(self) -> bool:
        return not self.ok and self.failures < PIN_TRIES

    def press(self, key: Any, now: float) -> str:
        """One key at `now`: "accepted", "wrong", "out of tries", or "" (nothing yet)."""
        if not self.waiting or key not in KEYPAD:
            return ""
        if key in "*#" or now - self.last_key > PIN_IDLE:
            self.entry = ""  # so a stray key, or the "#" after a PIN, never costs a strike
        self.last_key = now
        if key in "*#":
            return ""
        self.entry += key
        if len(self.entry) < len(self.pin):
            return ""
        entry, self.entry = self.entry, ""
        if hmac.compare_digest(entry.encode(), self.pin.encode()):
            self.ok = True
            return "accepted"
        self.failures += 1
        return "wrong" if self.failures < PIN_TRIES else "out of tries"


KEYPAD = tuple("0123456789*#")
PIN_TRIES = 3
PIN_IDLE = 5.0  # seconds without a key: a half-typed PIN is forgotten
# PIN_LOCK_AFTER wrong PINs across calls within PIN_LOCK_WINDOW lock the line for PIN_LOCK_SECONDS, doubled at
# each further lock up to a day (docs/security.md).
PIN_LOCK_AFTER = 10
PIN_LOCK_WINDOW = 3600.0
PIN_LOCK_SECONDS = 3600.0
PIN_LOCK_LONGEST = 24 * 3600.0


@dataclass
class PinLock:
    """Wrong PINs across all calls, and the lock they set."""
    failures: list[float] = field(default_factory=list)
    until: float = 0.0
    locks: int = 0

    @property
    def locked(self) -> bool:
        return self.until > time.time()

    def wrong_pin(self, now: float) -> bool:
        self.failures = [at for at in self.failures if now - at < PIN_LOCK_WINDOW] + [now]
        if len(self.failures) < PIN_LOCK_AFTER:
            return False
        self.until = now + min(PIN_LOCK_SECONDS * 2**self.locks, PIN_LOCK_LONGEST)
        self.locks += 1
        self.failures.clear()
        return True


@dataclass(slots=True)
class SilenceClock:
    """IDLE_SECONDS with no sign of the caller: ask if anyone is there; as long again: hang up."""
    idle: float  # IDLE_SECONDS
    quiet_since: float
    asked: bool = False
    speaking_since: float | None = None
    timer: asyncio.TimerHandle | None = None

    def caller(self, now: float, speaking: bool = False) -> None:
        """A sign of the caller: the clock starts again (and waits while they speak)."""
        self.quiet_since, self.asked, self.speaking_since = now, False, now if speaking else None

    def heard(self, now: float) -> None:
        """The assistant's turn ended, or OpenClaw answered."""
        self.quiet_since = now

    def look(self, now: float, busy: bool) -> str:
        """What to do at `now`: "" (nothing yet), "ask" (is anyone there?) or "hang up"."""
        if now < self.quiet_since + self.idle:
            return ""
        speaking = self.speaking_since is not None and now - self.speaking_since < SPEAKING_HOLD
        if busy or speaking:
            self.quiet_since = now
            return ""
        if self.asked:
            return "hang up"
        self.quiet_since, self.asked = now, True
        return "ask"


@dataclass(slots=True)
class ToolBreaker:
    """A model in a loop of tool calls: stopped past LOOP_CALLS a minute, then hung up; repeats answered."""
    calls: list[float] = field(default_factory=list)
    stopped: float = float("-inf")
    last: tuple[str, float, str] = ("", float("-inf"), "")  # the last question answered, when, answer

    def count(self, now: float) -> str:
        """One more tool call: "" (run it), "stop" (tell the model to stop) or "hang up"."""
        self.calls = [at for at in self.calls if now - at < LOOP_WINDOW] + [now]
        if len(self.calls) <= LOOP_CALLS:
            return ""
        if now - self.stopped < LOOP_WINDOW:
            return "hang up"
        self.stopped = now
        return "stop"

    def repeat(self, question: str, now: float) -> str:
        """The answer this same question got within REPEAT_WINDOW, or ""."""
        asked, at, answer = self.last
        return answer if question.casefold() == asked.casefold() and now - at < REPEAT_WINDOW else ""


# A call's token counts, from each response.done's usage.
TOKEN_COUNTS = ("input", "input_text", "input_audio", "input_cached", "output", "output_text", "output_audio")


@dataclass(slots=True)
class CallRecord:
    """What the call history keeps of a call (docs/history.md), gathered as it goes."""
    received: float  # time.monotonic() (the event loop's clock) of the webhook
    resumed: bool
    timeline: str = ""  # "<seconds since the webhook> <step>" a line (a byte a character)
    questions: tuple[dict[str, Any], ...] = ()
    tokens: list[int] = field(default_factory=lambda: [0] * len(TOKEN_COUNTS))
    transcript: tuple[str, ...] = ()
    greeting_id: Any = ""
    tool_calls: int = 0

    def __post_init__(self) -> None:
        if not self.resumed:
            self.mark("webhook arrived", self.received)

    def mark(self, step: str, now: float | None = None) -> float:
        at = (time.monotonic() if now is None else now) - self.received
        self.timeline += f"{at:.3f} {step}\n"
        return at

    def audio_started(self, response_id: Any) -> None:
        if self.greeting_id and response_id == self.greeting_id:
            self.greeting_id = ""
            self.mark("greeting audio started")

    def said(self, speaker: str, text: str) -> str:
        self.transcript += (f"{speaker} said: {text}",)
        return self.transcript[-1]

    def add_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        for index, name in enumerate(TOKEN_COUNTS):
            side, _, kind = name.partition("_")  # input_tokens, or input_token_details' audio_tokens
            counts = usage.get(f"{side}_token_details") if kind else usage
            count = counts.get(f"{kind or side}_tokens") if isinstance(counts, dict) else None
            if type(count) is int and count >= 0:
                self.tokens[index] += count

    def ask(self) -> dict[str, Any]:
        at = round(self.mark(f"question {len(self.questions) + 1} sent to OpenClaw"), 3)
        self.questions += ({"at": at, "outcome": "cancelled by the hangup"},)
        return self.questions[-1]

    def settle(self, question: dict[str, Any]) -> None:
        question["seconds"] = round(time.monotonic() - self.received - question["at"], 2)
        why = f": {question['why']}" if "why" in question else ""
        self.mark(f"question {len(self.questions)} {question['outcome']} after {question['seconds']:.1f}s{why}")

    def close(self, call_id: str, caller: str | None, agent: str, started: float, reason: str,
              pin: str | None) -> dict[str, Any]:
        seconds = time.monotonic() - self.received
        steps = [(float(at), text) for at, _, text in (line.partition(" ") for line in self.timeline.splitlines())]
        first = {text: at for at, text in reversed(steps)}
        for question in self.questions:
            question.setdefault("seconds", round(seconds - question["at"], 2))
            question["asked"] = utc_text(started + question["at"])
        return history_record(
            call_id, caller, agent, started, end=utc_text(time.time()), seconds=round(seconds, 1), end_reason=reason,
            first_word=first.get("greeting audio started", first.get("greeting started")),
            questions=list(self.questions), pin=pin, resumed=self.resumed, tokens=dict(zip(TOKEN_COUNTS, self.tokens)),
            reconnects=sum(text == "sideband reconnected" for _, text in steps),
            timeline=[*steps, (round(seconds, 3), f"ended: {reason}")], transcript=list(self.transcript),
        )


def history_record(call_id: str, caller: str | None, agent: str | None, started: float, **fields: Any) -> dict:
    """One call in the history, every field present (the number in full: the store is private)."""
    return {
        "call_id": call_id, "caller": caller, "agent": agent, "started": started, "start": utc_text(started),
        "turned_away": None, "end": None, "seconds": None, "end_reason": None, "first_word": None, "questions": [],
        "pin": None, "reconnects": 0, "resumed": False, "tokens": {}, "timeline": [], "transcript": [], **fields,
    }


def utc_text(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


class SignatureError(Exception):
    """The webhook is not provably from OpenAI."""


def verify_signature(key: bytes, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
    """Check a Standard Webhooks signature over the raw body; raise SignatureError saying why not."""
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    signatures = headers.get("webhook-signature", "")
    if not (msg_id and timestamp and signatures):
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature header")
    if not (msg_id + timestamp + signatures).isascii():
        raise SignatureError("webhook-id, webhook-timestamp or webhook-signature is not plain ASCII")
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise SignatureError("webhook-timestamp is not a number")
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > SIGNATURE_TOLERANCE:
        raise SignatureError("webhook-timestamp is more than 5 minutes away from now (replay, or a wrong clock)")
    expected = signature(key, msg_id, timestamp, body).encode()
    for entry in signatures.split():
        version, _, given = entry.partition(",")
        if version == "v1" and hmac.compare_digest(given.encode(), expected):
            return
    raise SignatureError("no webhook-signature matches (wrong OPENAI_WEBHOOK_SECRET?)")


def signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks: HMAC-SHA256 of "<id>.<timestamp>.<body>", in base64."""
    return base64.b64encode(hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()).decode()


SIGNATURE_TOLERANCE = 300
RECENT_IDS = 4096


def first_time(seen: dict[str, None], key: str) -> bool:
    if key in seen:
        return False
    seen[key] = None
    if len(seen) > RECENT_IDS:
        del seen[next(iter(seen))]
    return True


def json_object(text: str | bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def from_user(sip_headers: Any) -> str:
    """The user part of the From SIP header ("+1555...", "anonymous", ...), or ""."""
    for header in sip_headers if isinstance(sip_headers, list) else []:
        if isinstance(header, dict) and str(header.get("name", "")).lower() in ("from", "f"):
            # "Name" <sip:+1555...@host>;tag=x  |  <tel:+1555...>  |  sip:+1555...@host;tag=x
            value = re.sub(r'^\s*"(?:[^"\\]|\\.)*"', "", str(header.get("value", "")))  # a name may hold "<"
            uri = re.search(r"<([^<>]*)>", value)
            uri_text = uri.group(1) if uri else value.split(";")[0]
            match = re.match(r"\s*(?:sips?|tel):([^@;>]+)", uri_text, re.IGNORECASE)
            return match.group(1) if match else ""
    return ""


def normalise_number(text: str) -> str | None:
    text = re.sub(r"[\s().-]", "", text)
    if text.startswith("00"):
        text = "+" + text[2:]
    return text if re.fullmatch(r"\+[1-9]\d{6,14}", text) else None


def describe_caller(user: str) -> str:
    """The From user part for the log: a masked number, "withheld", or "unreadable" and its end."""
    if normalise_number(user) or not re.search(r"\d", user):
        return mask(normalise_number(user))
    return f"unreadable ({'*' * min(len(user) - 2, 20) + user[-2:]!r})"


def mask(number: str | None) -> str:
    """A phone number for the log, at most half of it shown: +1******4567."""
    if not number or number == "*":  # (ALLOWED_CALLERS' "*" as itself)
        return number or "withheld"
    tail = min(4, (len(number) - 1) // 2 - 1)
    return number[:2] + "*" * (len(number) - 2 - tail) + number[len(number) - tail:]


def agent_for(config: Config, number: str | None) -> str | None:
    """The caller-ID screen: this caller's agent, or None (a withheld number only matches "*")."""
    return config.allowed_callers.get(number or "*") or config.allowed_callers.get("*")


def turned_away(app: web.Application, agent: str | None) -> tuple[str, str, int]:
    """Why a new call is turned away (for the history, the log), and its SIP status; "": take it."""
    config, lock = app[CONFIG], app[PIN_LOCK]
    if app[DRAINING].is_set():
        return "shutting down", "shutting down", 486
    if agent is None:
        return "not listed", "caller not in ALLOWED_CALLERS", 603
    if config.call_pin and lock.locked:
        return "PIN lock", f"too many wrong PINs, the line is locked until {utc_text(lock.until)}", 603
    if config.max_concurrent_calls and len(app[CALLS]) >= config.max_concurrent_calls:
        return "busy", f"MAX_CONCURRENT_CALLS={config.max_concurrent_calls} calls are already live", 486
    return "", "", 0

# --- The clients: OpenAI's call control, and OpenClaw ---

REST_TIMEOUT = aiohttp.ClientTimeout(total=5)
MAX_BODY_BYTES = 256 * 1024


async def call_control(http: aiohttp.ClientSession, config: Config, call_id: str, action: str,
                       body: dict | None = None, delays: tuple[float, ...] = REST_RETRY_DELAYS) -> tuple[int, bool]:
    """POST to call control, retrying what may pass (no answer, 429, 5xx): (status or 0, any failed)."""
    clog = CallLog(call_id)
    for attempt, delay in enumerate((*delays, None)):
        try:
            async with http.post(call_control_url(config, call_id, action), json=body,
                                 headers=bearer(config.openai_api_key), timeout=REST_TIMEOUT) as resp:
                status = resp.status
                if status < 300:
                    return status, attempt > 0
                why = f"HTTP {status}: {await error_text(resp)}"
                if status == 404:
                    clog.info("%s: call is gone, the caller probably hung up (%s)", action, why)
                    return status, attempt > 0
                if status < 500 and status != 429:
                    hint = " (check OPENAI_API_KEY)" if status in (401, 403) else ""
                    if action == "accept" and status == 400:
                        hint = (" (check REALTIME_MODEL, VOICE, INSTRUCTIONS and LOG_TRANSCRIPTS: "
                                "they shape the accept body)")
                    clog.error("%s failed: %s%s", action, why, hint)
                    return status, attempt > 0
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status, why = 0, exc_text(exc)
        if delay is None:
            clog.error("%s failed, giving up: %s", action, why)
            return status, True
        clog.warning("%s failed, retrying in %.2fs: %s", action, delay, why)
        await asyncio.sleep(delay)
    return 0, True


async def read_body(resp: aiohttp.ClientResponse) -> bytes | None:
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return None
    return bytes(body)


async def error_text(resp: aiohttp.ClientResponse) -> str:
    body = await read_body(resp)
    if body is None:
        return f"an error body over {MAX_BODY_BYTES // 1024} KiB"
    raw = body.decode(errors="replace")
    error = (json_object(raw) or {}).get("error")
    if isinstance(error, dict) and "message" in error:
        return one_line(str(error["message"])[:300])
    return one_line(raw[:200].strip() or resp.reason or "")


OPENCLAW_SYSTEM_PROMPT = (
    "This request is relayed from a live phone call and your answer will be read aloud. "
    "Answer in one to three short, plain spoken sentences: no markdown, lists, links or emoji."
)
SAY_UNREACHABLE = "I couldn't reach your assistant just now. Please try again in a moment."
SAY_TOO_SLOW = "Your assistant is taking too long to answer. Please try again in a moment."
SAY_NO_ANSWER = "Your assistant didn't have an answer for that."
SAY_TOO_LONG = "Your assistant's answer was far too long to read out. Please ask for something shorter."
OPENCLAW_FIXES = {  # by HTTP status (0: no answer at all)
    0: "is the gateway running? check OPENCLAW_URL", 401: "check OPENCLAW_TOKEN", 403: "check OPENCLAW_TOKEN",
    404: "enable gateway.http.endpoints.chatCompletions in the OpenClaw config, or check OPENCLAW_URL",
    429: "the gateway is rate limiting",
}


class OpenClawError(Exception):
    """ask_openclaw failed: str(self) tells the owner what to fix, .say is for the caller."""

    def __init__(self, why: str, say: str = SAY_UNREACHABLE) -> None:
        super().__init__(why)
        self.say = say


async def ask_openclaw(http: aiohttp.ClientSession, config: Config, request: str, *, agent: str, user: str,
                       system: str) -> str:
    """Ask an OpenClaw agent one question in the session `user`: its answer, or OpenClawError."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": request}]
    body = {"model": f"openclaw:{agent}", "user": user, "messages": messages}
    try:
        async with http.post(f"{config.openclaw_url}/v1/chat/completions", json=body,
                             headers=bearer(config.openclaw_token),
                             timeout=aiohttp.ClientTimeout(total=config.openclaw_timeout)) as resp:
            if resp.status != 200:
                fix = openclaw_fix(config, agent, resp.status)
                raise OpenClawError(f"HTTP {resp.status}: {await error_text(resp)} ({fix})")
            raw = await read_body(resp)
            if raw is None:
                too_long = f"the answer was over {MAX_BODY_BYTES // 1024} KiB, so it was not read"
                raise OpenClawError(too_long, SAY_TOO_LONG)
    except asyncio.TimeoutError:
        raise OpenClawError(f"no answer within OPENCLAW_TIMEOUT={config.openclaw_timeout:g}s", SAY_TOO_SLOW) from None
    except aiohttp.ClientError as exc:
        why = exc_text(exc)
        raise OpenClawError(f"cannot reach {one_line(config.openclaw_url)} ({why}); {OPENCLAW_FIXES[0]}") from None
    try:
        answer = (json_object(raw) or {})["choices"][0]["message"]["content"]
    except (LookupError, TypeError):
        answer = None
    if not isinstance(answer, str):
        raise OpenClawError("the answer was not a chat completion (is OPENCLAW_URL the gateway?)")
    answer = answer.strip()
    if not answer or answer == "No response from OpenClaw.":
        raise OpenClawError("the agent returned an empty answer", SAY_NO_ANSWER)
    return answer if len(answer) <= MAX_ANSWER_CHARS else answer[:MAX_ANSWER_CHARS] + " ... (the rest was cut off)"


def openclaw_user(number: str | None, call_id: str) -> str:
    return f"voicebridge:{number}" if number else f"voicebridge:call:{call_id}"


def openclaw_system(number: str | None) -> str:
    who = f"Caller ID: {number} (caller ID can be faked)." if number else "Caller ID: withheld."
    return f"{OPENCLAW_SYSTEM_PROMPT} {who}"


def openclaw_fix(config: Config, agent: str, status: int) -> str:
    if status != 400:
        return OPENCLAW_FIXES.get(status, "the gateway or its model provider failed")
    # We always name an agent, so a 400 means "Unknown agent 'x'.": name the setting that named it.
    if agent == config.openclaw_agent:
        return "check OPENCLAW_AGENT"
    entries = ", ".join(f"{mask(who)}={named}" for who, named in config.allowed_callers.items() if named == agent)
    return f"check the ALLOWED_CALLERS entry {entries}, or add the agent to OpenClaw's agents.entries"


MAX_ANSWER_CHARS = 4000
AGENT_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
AGENT_ID_RULE = "lowercase letters, digits, '-' and '_', starting with a letter or digit, at most 64"

# --- The state store, and restart recovery ---

RECORD_WAIT = 0.2
STORE_BATCH = 0.05


class StateStore:
    """What outlives the process, in SQLite: live calls, the PIN lock, call ids seen, the history."""

    # One thread writes what is queued every STORE_BATCH: the event loop never waits on the disk. Only the accept
    # waits for its call's record (RECORD_WAIT at most): a call a restart did not know of would be billed until
    # OpenAI's cap. The schema is one idempotent transaction: a start that fails halfway leaves nothing half made.
    SCHEMA = f"""
        BEGIN;
        CREATE TABLE IF NOT EXISTS live_calls (call_id TEXT PRIMARY KEY, caller TEXT, agent TEXT NOT NULL,
            accepted_at REAL NOT NULL, pin_ok INTEGER NOT NULL, in_flight TEXT NOT NULL);  -- pin_ok: typed
        CREATE TABLE IF NOT EXISTS pin_lock (id INTEGER PRIMARY KEY CHECK (id = 1), failures TEXT NOT NULL,
            until REAL NOT NULL, locks INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS seen_calls (call_id TEXT PRIMARY KEY);
        CREATE TRIGGER IF NOT EXISTS seen_calls_bounded AFTER INSERT ON seen_calls
            BEGIN DELETE FROM seen_calls WHERE rowid <= NEW.rowid - {RECENT_IDS}; END;
        CREATE TABLE IF NOT EXISTS history (call_id TEXT PRIMARY KEY, started REAL NOT NULL, record TEXT NOT NULL);
        CREATE INDEX IF NOT EXISTS history_by_start ON history (started);
        PRAGMA user_version = 2;
        COMMIT;
    """
    TABLES = {"live_calls", "pin_lock", "seen_calls", "history"}

    def __init__(self, state_dir: str, history_days: float) -> None:
        self.path, self.history_days = Path(state_dir) / "voicebridge.db", history_days
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="voicebridge-state")
        self._db: sqlite3.Connection | None = None
        self._failures: set[str] = set()
        self._queued: list[tuple[str, str, tuple[Any, ...]]] = []
        self._pruning: asyncio.TimerHandle | None = None
        self._lock = -1

    async def open(self) -> tuple[list[tuple[Any, ...]], PinLock, dict[str, None]]:
        return await asyncio.wrap_future(self._thread.submit(self._open))

    def _open(self) -> tuple[list[tuple[Any, ...]], PinLock, dict[str, None]]:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:  # one voicebridge per STATE_DIR: a second would resume, and hang up, the first's calls
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StartupError(f"STATE_DIR={self.path.parent} is in use by another voicebridge, which holds its "
                                   "live calls: stop that one first, or give this one a STATE_DIR of its own") from None
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))  # 0600 whatever the umask
            self._db = db = sqlite3.connect(self.path)
            tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'")
            if {name for (name,) in tables} - self.TABLES:
                raise sqlite3.DatabaseError("it holds tables that are not voicebridge's")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > 2:
                raise ConfigError(f"STATE_DIR={self.path.parent}: {self.path.name} is from a newer voicebridge "
                                  f"(schema {version}): upgrade voicebridge, or set STATE_DIR to another folder")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(self.SCHEMA)  # a write: the file is writable now, not at the first call
            calls = db.execute("SELECT * FROM live_calls").fetchall()
            lock = db.execute("SELECT failures, until, locks FROM pin_lock").fetchone()
            seen = dict.fromkeys(row[0] for row in db.execute("SELECT call_id FROM seen_calls ORDER BY rowid"))
        except (OSError, sqlite3.Error) as exc:
            if type(exc) is sqlite3.DatabaseError:  # (not OperationalError: disk full, ...)
                raise ConfigError(f"STATE_DIR={self.path.parent}: {self.path} is not voicebridge's, or is damaged "
                                  f"({exc}): stop voicebridge, move the file aside (the call history and the PIN "
                                  "lock go with it), and start it again") from None
            failure = ConfigError if isinstance(exc, OSError) else StartupError
            raise failure(f"STATE_DIR={self.path.parent}: cannot create or write {self.path.name} ({exc}): give "
                          "its disk room and the user voicebridge runs as the right to write there, or set STATE_DIR"
                          ) from None
        return calls, PinLock(json.loads(lock[0]), *lock[1:]) if lock else PinLock(), seen

    def _write(self, batch: list[tuple[str, str, tuple[Any, ...]]]) -> None:
        assert self._db is not None
        call_id = ""
        try:
            with self._db:
                for call_id, sql, params in batch:
                    self._db.execute(sql, params)
        except sqlite3.Error as exc:
            if str(exc) not in self._failures:
                self._failures.add(str(exc))
                CallLog(call_id).error("state not saved to %s (%s): calls go on, but a restart now would lose track "
                                       "of them", self.path, exc)
            return
        if self._failures:
            log.warning("state saved again to %s", self.path)
            self._failures.clear()

    def write(self, call_id: str, sql: str, *params: Any) -> None:
        """Queue a statement; the store's thread gets the queue STORE_BATCH later."""
        self._queued.append((call_id, sql, params))
        if len(self._queued) == 1:  # (a wake-up per write costs ~0.1 ms of CPU)
            asyncio.get_running_loop().call_later(STORE_BATCH, lambda: self._queued and self.hand_over())

    def hand_over(self) -> Future[None]:
        batch, self._queued = self._queued, []
        return self._thread.submit(self._write, batch)

    async def written(self) -> None:
        """Hand over what is queued and wait for the disk, RECORD_WAIT at most."""
        await asyncio.wait({asyncio.wrap_future(self.hand_over())}, timeout=RECORD_WAIT)

    def save_call(self, call: Call) -> None:
        typed = call.keypad.ok and bool(call.keypad.pin)  # (a PIN set while down is then asked for)
        self.write(call.id, "INSERT OR REPLACE INTO live_calls VALUES (?, ?, ?, ?, ?, ?)", call.id, call.caller,
                   call.agent, call.accepted_at, typed, json.dumps(call.in_flight))

    def end_call(self, call_id: str) -> None:
        self.write(call_id, "DELETE FROM live_calls WHERE call_id = ?", call_id)

    def save_lock(self, call_id: str, lock: PinLock) -> None:
        self.write(call_id, "INSERT OR REPLACE INTO pin_lock VALUES (1, ?, ?, ?)", json.dumps(lock.failures),
                   lock.until, lock.locks)

    def seen(self, call_id: str) -> None:
        self.write(call_id, "INSERT OR IGNORE INTO seen_calls VALUES (?)", call_id)

    def save_history(self, record: dict[str, Any]) -> None:
        if self.history_days:
            self.write(record["call_id"], "INSERT OR REPLACE INTO history VALUES (?, ?, ?)", record["call_id"],
                       record["started"], json.dumps(record))

    def prune(self) -> None:
        """Delete the history older than HISTORY_DAYS, now and once a day."""
        self.write("", "DELETE FROM history WHERE started < ?", time.time() - self.history_days * 86400)
        self._pruning = asyncio.get_running_loop().call_later(86400, self.prune)

    async def close(self) -> None:
        if self._pruning is not None:
            self._pruning.cancel()
        if self._db is not None:
            await asyncio.wrap_future(self.hand_over())
            await asyncio.wrap_future(self._thread.submit(self._db.close))
        if self._lock >= 0:
            os.close(self._lock)
        self._thread.shutdown()


async def resume_calls(app: web.Application) -> None:
    """Pick up the calls a crashed run left: hang up those past MAX_CALL_SECONDS, attach the rest."""
    if app[LEFT_CALLS]:
        log.info("resuming %d call(s) left by the previous run", len(app[LEFT_CALLS]))
    for call_id, caller, agent, accepted_at, pin_typed, in_flight in app[LEFT_CALLS]:
        age, routed = max(0.0, time.time() - accepted_at), agent_for(app[CONFIG], caller)
        call = app[CALLS][call_id] = Call(app, call_id, caller, routed or agent, time.monotonic() - age, accepted_at)
        call.keypad.ok, call.in_flight = bool(pin_typed) or call.keypad.ok, tuple(json.loads(in_flight))
        if age >= app[CONFIG].max_call_seconds:
            call.log.info("left by the previous run %.0fs after its accept: past MAX_CALL_SECONDS, hanging up", age)
            call.end_reason = "max_duration"
        elif routed is None:
            call.log.info("no longer in ALLOWED_CALLERS: hanging up")
            call.end_reason = "not_listed"
        call.task = spawn(app[TASKS], call_id, call.run())

# --- The log: a line per event, the call id first, nothing secret, outside text escaped ---

class CallLog(logging.LoggerAdapter):
    """The module's logger, with the call id in front of every line."""

    def __init__(self, call_id: str) -> None:
        super().__init__(log)
        self.call_id = call_id

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.call_id}] {msg}", kwargs


def one_line(text: Any, limit: int = MAX_TRANSCRIPT_CHARS) -> str:
    """Outside text as one line: no URL's user:password@, control and bidi characters escaped, cut short."""
    text = re.sub(r"(\w[\w+.-]*://)[^/?#\s]*@", r"\1", str(text))
    text = re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]",
                  lambda char: repr(char.group())[1:-1], text)
    return text if len(text) <= limit else text[:limit] + "…"


def exc_text(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


class JournalFormat(logging.Formatter):
    """Each line led by its priority (<3>: ERROR); the journal adds the time."""

    def format(self, record: logging.LogRecord) -> str:
        priority = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.CRITICAL: 2}.get(record.levelno, 3)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """Whether stderr is the journal (systemd then sets JOURNAL_STREAM)."""
    try:
        stream = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{stream.st_dev}:{stream.st_ino}"


@dataclass
class Throttled:
    """Lines outsiders can cause at will: each once every `every` seconds, counting those held back."""
    every: float = 1.0
    last: dict[str, tuple[float, int]] = field(default_factory=dict)

    def warning(self, text: str, level: int = logging.WARNING) -> None:
        """Log text (a fixed few, never outside text), or count it if it is too soon."""
        now, (at, held) = time.monotonic(), self.last.get(text, (float("-inf"), 0))
        if now - at < self.every:
            self.last[text] = at, held + 1
            return
        log.log(level, "%s%s", text, f" (and {held} more since the last line)" if held else "")
        self.last[text] = now, 0


def loop_error(throttled: Throttled, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's errors; a refused accept() (no descriptors) is retried each second."""
    if context.get("message") != "socket.accept() out of system resource":
        return loop.default_exception_handler(context)
    throttled.warning(f"out of file descriptors ({exc_text(context['exception'])}): new connections wait; "
                      "the unit's LimitNOFILE= is 65536, and the port must sit behind a proxy", logging.ERROR)

# --- The app: its state, its life, and its shutdown ---

# (Types as annotations: Config comes later, and these lines run at import.)
CONFIG: web.AppKey[Config] = web.AppKey("config")
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http")
CALLS: web.AppKey[dict[str, Call]] = web.AppKey("calls")
TASKS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("tasks")
SEEN_CALLS: web.AppKey[dict[str, None]] = web.AppKey("seen_calls")
STORE: web.AppKey[StateStore] = web.AppKey("store")
LEFT_CALLS: web.AppKey[list[tuple[Any, ...]]] = web.AppKey("left_calls")
DRAINING: web.AppKey[asyncio.Event] = web.AppKey("draining")
PIN_LOCK: web.AppKey[PinLock] = web.AppKey("pin_lock")
REJECTED: web.AppKey[Throttled] = web.AppKey("rejected")
SHUTDOWN_AFTER_GRACE = 20.0  # after SHUTDOWN_GRACE: the goodbye (10 s), the hangups


def spawn(tasks: set[asyncio.Task[Any]], name: str, coro: Any, crashed: Callable[[], Any] = lambda: None
          ) -> asyncio.Task[Any]:
    """Run work in the background, kept in `tasks`; a crash is logged, then `crashed()`."""
    task = asyncio.create_task(coro, name=name)
    tasks.add(task)
    task.add_done_callback(functools.partial(forget, tasks, crashed))
    return task


def forget(tasks: set[asyncio.Task[Any]], crashed: Callable[[], Any], task: asyncio.Task[Any]) -> None:
    tasks.discard(task)
    if not task.cancelled() and task.exception():
        CallLog(task.get_name()).error("unexpected error", exc_info=task.exception())
        crashed()


async def healthz(request: web.Request) -> web.Response:
    app, draining = request.app, request.app[DRAINING].is_set()
    locked = app[CONFIG].call_pin and app[PIN_LOCK].locked
    return web.json_response({"status": "draining" if draining else "ok", "active_calls": len(app[CALLS]),
                              "max_concurrent_calls": app[CONFIG].max_concurrent_calls or None,
                              "pin_locked_until": utc_text(app[PIN_LOCK].until) if locked else None},
                             status=503 if draining else 200)


async def http_session(app: web.Application) -> AsyncIterator[None]:
    # limit=0: each live call holds a connection; the default pool of 100 would stall call 101
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        app[HTTP] = session
        yield


async def state_store(app: web.Application) -> AsyncIterator[None]:
    app[STORE] = StateStore(app[CONFIG].state_dir, app[CONFIG].history_days)
    app[LEFT_CALLS], app[PIN_LOCK], app[SEEN_CALLS] = await app[STORE].open()
    app[STORE].prune()
    yield
    await app[STORE].close()


def make_app(config: Config) -> web.Application:
    # aiohttp's keep-alive timer runs from a connection's start: one with no whole head is closed too.
    app = web.Application(client_max_size=MAX_WEBHOOK_BYTES, handler_args={"keepalive_timeout": BODY_TIMEOUT})
    app[CONFIG] = config
    app[CALLS] = {}
    app[TASKS] = set()
    app[DRAINING] = asyncio.Event()
    app[REJECTED] = Throttled()
    app.cleanup_ctx.extend((state_store, http_session))  # the store first: a bad STATE_DIR stops all
    app.on_shutdown.append(functools.partial(drain, grace=0))  # a last resort: serve() drains first
    app.router.add_post("/webhook", webhook)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(config: Config) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain while still answering webhooks, then stop."""
    # aiohttp would wait 60 s for requests in flight; ours end within BODY_TIMEOUT
    runner = web.AppRunner(make_app(config), handle_signals=False, shutdown_timeout=BODY_TIMEOUT)
    stop = asyncio.Event()  # (first: a SIGTERM as the banner goes out must drain, not kill)
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    asyncio.get_running_loop().set_exception_handler(functools.partial(loop_error, Throttled(every=60.0)))
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
    except OSError as exc:  # taken (exit 1), or HOST and PORT are wrong here (78)
        await runner.cleanup()
        why = os.strerror(exc.errno).lower() if exc.errno and exc.errno > 0 else one_line(exc)
        taken = exc.errno == errno.EADDRINUSE
        raise (StartupError if taken else ConfigError)(
            f"cannot listen on {config.host}:{config.port} ({why}): " + ("stop the program that has this port "
            "(another voicebridge?), or set PORT to a free one" if taken else "check HOST and PORT")) from None
    log_banner(config)
    spawn(runner.app[TASKS], "", tell_systemd(runner.app))  # READY=1: the port is open
    await resume_calls(runner.app)  # only now: a start that cannot bind leaves them to the next
    spawn(runner.app[TASKS], "", warn_of_shutdown(runner.app))
    # Imports' ~35k objects out of the collector's way: a full collection takes ms, not ~80 ms.
    gc.freeze()
    await stop.wait()
    log.info("shutdown requested: new calls are now refused")
    await drain(runner.app, config.shutdown_grace)
    await runner.cleanup()
    log.info("stopped")


def notify(*lines: str) -> None:
    """sd_notify: tell systemd how the service is, in a datagram to $NOTIFY_SOCKET (if set)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(lines).encode(), "\0" + address[1:] if address[0] == "@" else address)


async def tell_systemd(app: web.Application) -> None:
    """READY=1; then the live calls (systemctl status) and, with WatchdogSec=, WATCHDOG=1 every half of
    WATCHDOG_USEC, from the event loop: a stuck loop stops the pings, and systemd restarts the service."""
    ours = os.environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
    usec = os.environ.get("WATCHDOG_USEC", "") if ours else ""
    ping = ["WATCHDOG=1"] if usec.isdigit() else []
    notify("READY=1")
    while "NOTIFY_SOCKET" in os.environ:
        notify(f"STATUS={len(app[CALLS])} live call(s)", *ping)
        await asyncio.sleep(int(usec) / 2e6 if ping else 10.0)


async def warn_of_shutdown(app: web.Application) -> None:
    """Ask OpenAI once whether REALTIME_MODEL has a shutdown date; silent if OpenAI cannot tell."""
    config = app[CONFIG]
    model = f"{config.openai_base_url}/models/{quote(config.model, safe='')}"
    status, reply = await probe(app[HTTP], "GET", model, "OPENAI_BASE_URL", headers=bearer(config.openai_api_key))
    warning = shutdown_warning(config.model, status, reply, datetime.now(timezone.utc).date())
    if warning:
        log.log(*warning)
    log.debug("REALTIME_MODEL's model object: %s", one_line(reply, 300))


async def drain(app: web.Application, grace: float) -> None:
    """Refuse new calls, let live ones go on for `grace` seconds, then say goodbye and hang up."""
    app[DRAINING].set()
    notify("STOPPING=1", f"STATUS=shutting down: {len(app[CALLS])} live call(s)")
    try:
        async with timeout(grace + SHUTDOWN_AFTER_GRACE):  # one deadline: systemd kills no hangup
            if app[CALLS] and grace > 0:
                log.info("shutting down: %d live call(s) may go on for up to %gs", len(app[CALLS]), grace)
                await asyncio.wait({call.task for call in app[CALLS].values() if call.task}, timeout=grace)
            calls = list(app[CALLS].values())
            if calls:
                log.info("shutting down: hanging up %d call(s)", len(calls))
                goodbyes = (call.hang_up_after_goodbye("shutdown", goodbye=SHUTDOWN_GOODBYE) for call in calls)
                await asyncio.gather(*goodbyes)
    except asyncio.TimeoutError:
        log.error("shutting down: %d call(s) not hung up in time; OpenAI ends them in 60 minutes", len(app[CALLS]))
    for task in app[TASKS]:
        task.cancel()
    await asyncio.gather(*app[TASKS], return_exceptions=True)

# --- The settings: read once at start, every problem named with its fix ---

EX_CONFIG = 78  # a configuration error (sysexits.h); the unit's RestartPreventExitStatus=


class StartupError(Exception):
    """The service cannot start for a reason outside its settings: exit status 1."""


class ConfigError(Exception):
    """Settings missing or malformed: a message per problem, saying how to fix it."""

    def __str__(self) -> str:
        return "\n".join(map(str, self.args))


@dataclass(frozen=True)
class Config:
    """Every setting, parsed and checked (each explained in .env.example)."""
    openai_api_key: str
    webhook_key: bytes  # OPENAI_WEBHOOK_SECRET, base64-decoded
    openai_base_url: str = "https://api.openai.com/v1"
    openclaw_url: str = "http://127.0.0.1:18789"
    openclaw_token: str = ""
    openclaw_agent: str = "main"
    openclaw_timeout: float = 30.0
    allowed_callers: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8080
    model: str = "gpt-realtime-2.1"
    voice: str = "marin"
    instructions: str = ""
    greeting: str = ""
    max_call_seconds: float = 900.0
    shutdown_grace: float = 30.0
    call_pin: str = ""
    pin_timeout: float = 60.0
    max_concurrent_calls: int = 3  # 0: no limit
    idle_seconds: float = 30.0  # 0: off
    state_dir: str = "state"  # parse(): $STATE_DIRECTORY, or ./state beside this file
    history_days: float = 30.0  # 0: no call history
    log_transcripts: bool = False
    log_level: str = "INFO"
    reasoning_effort: str = ""  # empty: the model's own default
    webhook_url: str = ""

    @classmethod
    def parse(cls, env: Mapping[str, str], need_openai: bool = True, where: str = "the settings file"
              ) -> tuple[Config, list[str]]:
        """The config (a default where a setting is wrong), and every problem."""
        problems: list[str] = []

        def get(name: str, default: str = "") -> str:
            return env.get(name, "").strip() or default

        def number(name: str, default: float, minimum: float, maximum: float = 1e9) -> float:
            raw = get(name, str(default))
            try:
                value = float(raw)
            except ValueError:
                problems.append(f"{name}={raw!r} is not a number")
                return default
            if not minimum <= value <= maximum:  # (also refuses nan and inf)
                problems.append(f"{name}={raw!r} must be a number between {minimum:g} and {maximum:,.0f}")
                return default
            return value

        def url(name: str, default: str) -> str:
            value = get(name, default).rstrip("/")
            if not value:
                return value
            try:
                parts = urlsplit(value)
                usable = parts.scheme in ("http", "https") and parts.hostname and parts.port != 0
            except ValueError:
                usable = False
            if not usable:  # (its value is never shown: it may hold a password)
                problems.append(f"{name} is not a usable URL: it needs http:// or https://, a host, and any port "
                                "between 1 and 65535")
            return value if usable else default

        key = get("OPENAI_API_KEY")
        if need_openai and key in ("", "sk-..."):
            problems.append(f"OPENAI_API_KEY {'is still the placeholder from .env.example' if key else 'is not set'}: "
                            f"put your OpenAI API key in {where}")
            key = ""
        webhook_key, problem = parse_webhook_secret(get("OPENAI_WEBHOOK_SECRET")) if need_openai else (b"", "")
        if problem:
            problems.append(problem)
        agent = get("OPENCLAW_AGENT", cls.openclaw_agent)
        if not AGENT_ID.fullmatch(agent):
            problems.append(f"OPENCLAW_AGENT={agent!r} is not an OpenClaw agent id ({AGENT_ID_RULE})")
            agent = cls.openclaw_agent
        callers: dict[str, str] = {}
        for entry in filter(None, (entry.strip() for entry in get("ALLOWED_CALLERS").split(","))):
            who, _, named = (part.strip() for part in entry.partition("="))
            caller = "*" if who == "*" else normalise_number(who)
            if caller is None:
                problems.append(f"ALLOWED_CALLERS: {who!r} is not an E.164 number like +15551234567, nor *")
            elif "=" in entry and not AGENT_ID.fullmatch(named):
                problems.append(f"ALLOWED_CALLERS: in {entry!r}, {named!r} is not an OpenClaw agent id "
                                f"({AGENT_ID_RULE})")
            elif callers.setdefault(caller, named or agent) != (named or agent):
                problems.append(f"ALLOWED_CALLERS lists {mask(caller)} twice, for agents {callers[caller]!r} and "
                                f"{named or agent!r}: keep one entry")
        pin = get("CALL_PIN")
        if pin and not re.fullmatch(r"\d{4,12}", pin):
            problems.append("CALL_PIN must be 4 to 12 digits (the caller types it on the keypad)")
            pin = ""
        transcripts = get("LOG_TRANSCRIPTS", "0").lower()
        if transcripts not in ("0", "1", "no", "yes", "false", "true", "off", "on"):
            problems.append(f"LOG_TRANSCRIPTS={transcripts!r}: use 1 to log what is said on calls, or 0 (default)")
        idle = number("IDLE_SECONDS", cls.idle_seconds, 0)
        if 0 < idle < 10:
            problems.append(f"IDLE_SECONDS={idle:g}: use 0 (never hang up on silence) or 10 seconds or more")
            idle = cls.idle_seconds
        effort = get("REASONING_EFFORT").lower()
        if effort not in ("", "minimal", "low", "medium", "high", "xhigh"):
            problems.append(f"REASONING_EFFORT={effort!r}: use minimal, low, medium, high or xhigh (or nothing: the "
                            "model's own default)")
            effort = ""
        level = get("LOG_LEVEL", "INFO").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append(f"LOG_LEVEL={level!r}: use DEBUG, INFO, WARNING or ERROR")
            level = cls.log_level
        state_dir = get("STATE_DIR", env.get("STATE_DIRECTORY", "").split(":")[0])  # (the unit's StateDirectory=)
        return cls(
            openai_api_key=key, webhook_key=webhook_key, openai_base_url=url("OPENAI_BASE_URL", cls.openai_base_url),
            openclaw_url=url("OPENCLAW_URL", cls.openclaw_url), openclaw_token=get("OPENCLAW_TOKEN"),
            openclaw_agent=agent, openclaw_timeout=number("OPENCLAW_TIMEOUT", cls.openclaw_timeout, 1),
            allowed_callers=callers, host=get("HOST", cls.host), port=int(number("PORT", cls.port, 1, 65535)),
            model=get("REALTIME_MODEL", cls.model), voice=get("VOICE", cls.voice), reasoning_effort=effort,
            instructions=get("INSTRUCTIONS"), greeting=get("GREETING"),
            max_call_seconds=number("MAX_CALL_SECONDS", cls.max_call_seconds, 10),
            shutdown_grace=number("SHUTDOWN_GRACE", cls.shutdown_grace, 0), idle_seconds=idle,
            call_pin=pin, pin_timeout=number("PIN_TIMEOUT", cls.pin_timeout, 10),
            max_concurrent_calls=int(number("MAX_CONCURRENT_CALLS", cls.max_concurrent_calls, 0)),
            state_dir=state_dir or str(Path(__file__).parent / "state"),
            history_days=number("HISTORY_DAYS", cls.history_days, 0, 36500),
            log_transcripts=transcripts in ("1", "yes", "true", "on"), log_level=level,
            webhook_url=url("WEBHOOK_URL", ""),
        ), problems


def user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def parse_webhook_secret(secret: str) -> tuple[bytes, str]:
    """The HMAC key of a "whsec_<base64>" secret, and what is wrong with it ("": nothing)."""
    if secret == "whsec_..." or not secret.startswith("whsec_"):
        problem = ("is still the placeholder from .env.example" if secret == "whsec_..." else
                   "must start with 'whsec_'" if secret else "is not set")
        return b"", f"OPENAI_WEBHOOK_SECRET {problem}: copy the webhook's signing secret from OpenAI's dashboard"
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError:
        key = b""
    return key, "" if key else "OPENAI_WEBHOOK_SECRET is not valid base64 after 'whsec_': was it cut short?"


def read_settings(path: Path, required: bool) -> tuple[dict[str, str], list[str]]:
    """The settings file as python-dotenv reads it ($ stays literal), and its lines' problems."""
    try:
        with path.open(encoding="utf-8") as stream:
            # dotenv_values() is made of these, but skips a line it cannot parse with a warning:
            # here it is refused, for CALL_PIN="1234 must never mean "no PIN".
            bindings = list(parse_stream(stream))
    except FileNotFoundError:
        if required:
            raise ConfigError(f"--env-file {path}: there is no such file") from None
        return {}, []
    except PermissionError:
        raise ConfigError(f"cannot read {path} as user {user()} (permission denied): let that user read it, e.g. "
                          f"sudo chown root:{user()} {path} && sudo chmod 640 {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({one_line(exc)})") from None
    values: dict[str, str] = {}
    problems = []
    for binding in bindings:
        if binding.error or binding.key is not None and binding.value is None:
            problems.append(f"{path}, line {binding.original.line}: python-dotenv cannot read this line (a quote not "
                            "closed? no '='?): write KEY=value, with # before a comment")
        elif binding.key is not None:
            values[binding.key] = binding.value or ""
    return values, problems

# --- The command line: --check, --ask, --calls, and main ---

VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
PRICING = "https://developers.openai.com/api/docs/pricing"


def config_warnings(config: Config) -> Iterator[tuple[int, str]]:
    warn, fail = logging.WARNING, logging.ERROR
    if not config.allowed_callers:
        yield (fail, "ALLOWED_CALLERS is empty: EVERY CALL WILL BE REJECTED. List your own number(s).")
    elif "*" in config.allowed_callers:
        pin = "." if config.call_pin else ", and CALL_PIN is not set."
        yield (warn, "ALLOWED_CALLERS has *: ANYONE WHO DIALS THE NUMBER CAN DRIVE YOUR OPENCLAW AGENT "
               f"{config.allowed_callers['*']!r}{pin}")
    if 0 < len(config.call_pin) < 6:
        yield (warn, f"CALL_PIN has {len(config.call_pin)} digits: use 6 or more. Each extra digit makes "
               "guessing it ten times slower, and guessing is what the keypad is open to")
    if config.voice not in VOICES:
        yield (warn, f"VOICE={config.voice} is not one of the documented voices ({', '.join(VOICES)}): "
               "fine if OpenAI has added it, otherwise every accept fails")
    if config.reasoning_effort and not takes_reasoning(config.model):
        yield (warn, f"REASONING_EFFORT={config.reasoning_effort} is not sent: REALTIME_MODEL={config.model} takes no "
               "reasoning")


def shutdown_warning(model: str, status: int, reply: str, today: date) -> tuple[int, str] | None:
    """What OpenAI's model object (GET /models/{model}) says of its shutdown (the date as given: undocumented)."""
    shutdown = (json_object(reply) or {}).get("shutdown_date") if status == 200 else None
    better = "gpt-realtime-2.1-mini" if "mini" in model else Config.model
    fix = f"set REALTIME_MODEL={better}" if better != model else "see developers.openai.com/api/docs/deprecations"
    if not shutdown:
        return None
    with contextlib.suppress(ValueError):
        if date.fromisoformat(str(shutdown)[:10]) <= today:
            return logging.ERROR, f"REALTIME_MODEL={model} was shut down by OpenAI on {shutdown}, so calls fail: {fix}"
    return logging.WARNING, f"REALTIME_MODEL={model} will be shut down by OpenAI on {shutdown}: {fix} before then"


def log_banner(config: Config) -> None:
    routes = ", ".join(f"{mask(who)} -> {agent}" for who, agent in config.allowed_callers.items())
    for line in (
        f"voicebridge listening on http://{config.host}:{config.port} (POST /webhook, GET /healthz)",
        f"  OpenAI     {one_line(config.openai_base_url)}  key {'set' if config.openai_api_key else 'NOT SET'}",
        f"  session    model {config.model}, voice {config.voice}, max {config.max_call_seconds:g}s per call, "
        f"transcripts {'LOGGED (LOG_TRANSCRIPTS=1)' if config.log_transcripts else 'off'}",
        f"  OpenClaw   {one_line(config.openclaw_url)}  token {'set' if config.openclaw_token else 'NOT SET'}"
        f"  timeout {config.openclaw_timeout:g}s",
        f"  callers    {routes or 'nobody'} (caller -> OpenClaw agent)",
        f"  limits     keypad PIN {'required' if config.call_pin else 'off'}; "
        f"at most {config.max_concurrent_calls or 'any number of'} call(s) at once",
        f"  shutdown   live calls get {config.shutdown_grace:g}s after SIGTERM",
    ):
        log.info("%s", line)
    for level, warning in config_warnings(config):
        log.log(level, "%s", warning)


async def probe(http: aiohttp.ClientSession, method: str, url: str, setting: str, **kwargs: Any) -> tuple[int, str]:
    """One request: (status, the body if 200, else the error); 0 if nothing answered, saying why."""
    try:
        async with http.request(method, url, timeout=REST_TIMEOUT, **kwargs) as resp:
            if resp.status != 200:
                return resp.status, await error_text(resp)
            return 200, (await read_body(resp) or b"").decode(errors="replace")
    except aiohttp.ClientConnectorDNSError as exc:
        return 0, f"cannot resolve host {one_line(exc.host)} ({setting})"
    except aiohttp.ClientConnectorError as exc:  # (a certificate that does not verify too: its errno says nothing)
        number = 0 if isinstance(exc, aiohttp.ClientSSLError) else exc.os_error.errno
        why = os.strerror(number).lower() if number else one_line(exc.os_error)
        return 0, f"cannot connect to {one_line(exc.host)}:{exc.port} ({setting}): {why}"
    except asyncio.TimeoutError:
        return 0, f"no answer within {REST_TIMEOUT.total:g} s ({setting})"
    except aiohttp.ClientError as exc:
        return 0, f"{exc_text(exc)} ({setting})"


async def check(config: Config, today: date | None = None, problems: list[str] | tuple[()] = ()) -> int:
    """--check: the whole checklist, probing OpenAI and OpenClaw with no call."""
    agents = list(dict.fromkeys([config.openclaw_agent, *config.allowed_callers.values()]))
    test = json.dumps({"object": "event", "id": f"evt_check_{os.urandom(8).hex()}", "type": "voicebridge.check",
                       "created_at": int(time.time()), "data": {}}).encode()
    sent, at = f"wh_check_{os.urandom(8).hex()}", str(int(time.time()))
    signed = {"webhook-id": sent, "webhook-timestamp": at, "content-type": "application/json",
              "webhook-signature": f"v1,{signature(config.webhook_key, sent, at, test)}"}
    async with aiohttp.ClientSession() as http:
        # Retrieving the model proves the key and that its project may use it; messages=[] makes the
        # gateway check the token, the endpoint and the agent, and stop before any agent run.
        (status, reply), *claws = await asyncio.gather(
            probe(http, "GET", f"{config.openai_base_url}/models/{quote(config.model, safe='')}", "OPENAI_BASE_URL",
                  headers=bearer(config.openai_api_key))
            if config.openai_api_key
            else asyncio.sleep(0, (-1, "not tried without a usable OPENAI_API_KEY")),
            probe(http, "POST", config.webhook_url, "WEBHOOK_URL", data=test, headers=signed) if config.webhook_url
            else asyncio.sleep(0, (-1, "")),
            *(probe(http, "POST", f"{config.openclaw_url}/v1/chat/completions", "OPENCLAW_URL",
                    headers=bearer(config.openclaw_token), json={"model": f"openclaw:{agent}", "messages": []})
              for agent in agents),
        )
    hook, reply_hook = claws.pop(0)
    openai_fix = (  # a 404 is model_not_found: the key is fine, the model is not
        f"REALTIME_MODEL={config.model} is not available to this key's project: check the spelling and the project's "
        f"model permissions in the OpenAI dashboard; the default is {Config.model}" if status == 404
        else "OpenAI refused OPENAI_API_KEY: check it, and that its project is active" if status in (401, 403)
        else "check OPENAI_BASE_URL"
    )
    today = today or datetime.now(timezone.utc).date()
    warnings = [*config_warnings(config), *filter(None, [shutdown_warning(config.model, status, reply, today)])]
    checks = [
        ("configuration complete, OPENAI_WEBHOOK_SECRET well formed", "\n      ".join(problems)),
        ("no setting makes every call fail (ALLOWED_CALLERS, REALTIME_MODEL's shutdown date)",
         "\n      ".join(text for level, text in warnings if level >= logging.ERROR)),
        (f"OpenAI accepts OPENAI_API_KEY and serves REALTIME_MODEL={config.model} (GET /models/{config.model})",
         "" if status == 200 else reply if status <= 0 else f"HTTP {status}: {reply} ({openai_fix})"),
        *((f"OpenClaw at {one_line(config.openclaw_url)}: reachable, token accepted, chat endpoint enabled, "
           f"agent {agent!r} exists", "" if claw == 400 and "user message" in text.lower()
           else f"{text} ({OPENCLAW_FIXES[0]})" if claw == 0
           else f"HTTP {claw}: {text} ({openclaw_fix(config, agent, claw)})")
          for agent, (claw, text) in zip(agents, claws)),
        (f"STATE_DIR={config.state_dir} can be made and written by user {user()}", state_dir_problem(config.state_dir)),
    ]
    if config.webhook_url:
        checks.append((f"a signed test event reaches the service at WEBHOOK_URL={one_line(config.webhook_url)}",
                       webhook_problem(hook, reply_hook)))
    for level, warning in warnings:
        if level < logging.ERROR:
            print(f"WARN  {warning}")
    print(f"ok    CALL_PIN is set ({len(config.call_pin)} digits)" if config.call_pin else
          "WARN  no CALL_PIN: a caller ID, which can be faked, is all it takes to reach your assistant")
    if not config.webhook_url:
        print("WARN  no WEBHOOK_URL: the public path (DNS, the certificate, the proxy, the service) was not tested")
    for what, problem in checks:
        print(f"FAIL  {what}\n      {problem}" if problem else f"ok    {what}")
    failed = sum(bool(problem) for _, problem in checks)
    print(f"{failed} problem(s) found." if failed else "All good: ready for calls.")
    return EX_CONFIG if problems else 1 if failed else 0


def webhook_problem(status: int, reply: str) -> str:
    """What the signed test event through WEBHOOK_URL met, or ""."""
    if status == 200:
        return ""
    if status == 400 and reply.startswith("invalid webhook signature"):  # (voicebridge's own words)
        return f"{reply}: " + ("set the clocks right (sudo timedatectl set-ntp true)" if "timestamp" in reply else
                               "the service runs with another OPENAI_WEBHOOK_SECRET (the file was edited since: sudo "
                               "systemctl restart voicebridge), or WEBHOOK_URL reaches another one")
    got = f"HTTP {status}: {reply}" if status > 0 else reply
    return f"{got}: check WEBHOOK_URL, its DNS, certificate and proxy (README: The phone rings and nothing happens)"


def state_dir_problem(state_dir: str) -> str:
    """Why this user could not make or write STATE_DIR, or ""."""
    if state_dir == "/var/lib/voicebridge" and not os.path.exists(state_dir):
        return ""  # (the unit's StateDirectory= makes it as the service starts)
    folder = next(path for path in (Path(state_dir), *Path(state_dir).parents) if os.path.exists(path))
    if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
        return ""
    return (f"{folder} is not a folder user {user()} may write in: run this as the user voicebridge runs as, and "
            "set STATE_DIR to a folder it may write (under the unit: /var/lib/voicebridge)")


async def ask(config: Config, question: str, caller: str | None = None) -> int:
    """--ask: ask OpenClaw as a call (from `caller`) would; print what the caller would hear."""
    agent, user, system = config.openclaw_agent, "voicebridge:cli", OPENCLAW_SYSTEM_PROMPT
    if caller is not None:
        number = normalise_number(caller)
        routed = agent_for(config, number) if number else None
        if routed is None:
            why = ("not an E.164 number like +15551234567" if number is None
                   else "ALLOWED_CALLERS turns this caller away, so no call of theirs reaches OpenClaw")
            print(f"--caller {caller}: {why}")
            return 1
        agent, user, system = routed, openclaw_user(number, "cli"), openclaw_system(number)
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        try:
            answer, problem = await ask_openclaw(http, config, question, agent=agent, user=user, system=system), ""
        except OpenClawError as exc:
            answer, problem = exc.say, str(exc)
    print(f"The caller would hear: {answer}")
    print(f"(agent {agent}, {time.monotonic() - started:.1f}s{'; problem: ' + problem if problem else ''})")
    return 1 if problem else 0


def show_history(config: Config, call_id: str, last: int, as_json: bool, numbers: bool) -> int:
    """--calls: read the history read-only and show it."""
    path = Path(config.state_dir).resolve() / "voicebridge.db"
    query = "SELECT record FROM history " + ("WHERE substr(call_id, 1, ?) = ?" if call_id else "") + \
        " ORDER BY started DESC LIMIT ?"
    rows = []
    try:  # (exists() can be refused too: the folder is the service user's)
        if path.exists():
            with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
                rows = db.execute(query, (len(call_id), call_id, 10) if call_id else (last,)).fetchall()
    except (OSError, sqlite3.Error) as exc:
        if "no such table" not in str(exc):
            print(f"cannot read the call history in {path} ({one_line(exc)}): run this as the user voicebridge runs "
                  "as (sudo -u voicebridge ...), with its STATE_DIR", file=sys.stderr)
            return 1
    records = [record for record in (json_object(text) for (text,) in rows) if record]
    if len(records) < len(rows):
        print(f"{len(rows) - len(records)} record(s) in {path} could not be read, left out", file=sys.stderr)
    if not records:
        where = "" if rows or path.exists() else ": there is no voicebridge.db there (is this the service's STATE_DIR?)"
        print(f"no call {call_id} in the history in {path}" if call_id else
              f"no call history yet in {path} (STATE_DIR={config.state_dir}){where}", file=sys.stderr)
        return 1 if call_id else 0
    exact = [record for record in records if record["call_id"] == call_id]
    if call_id and len(records) > 1 and not exact:
        ids = ", ".join(record["call_id"] for record in records)
        print(f"{call_id} starts more than one call id ({ids}{', ...' * (len(rows) == 10)}): give more of it",
              file=sys.stderr)
        return 1
    records = exact or records
    if as_json:
        for record in records:
            print(json.dumps({**record, "caller": shown(record["caller"], numbers)}))
    elif call_id:
        show_call(records[0], numbers)
    else:
        show_calls(records, numbers)
    return 0


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    if not ordered:
        return "-"
    p50, p95 = (ordered[math.ceil(share * len(ordered)) - 1] for share in (0.5, 0.95))
    return f"p50 {p50:.1f}s, p95 {p95:.1f}s (of {len(ordered)})"


def shown(number: str | None, in_full: bool) -> str:
    return (number or "withheld") if in_full else mask(number)


def show_calls(records: list[dict[str, Any]], numbers: bool) -> None:
    rows = [("when", "caller", "agent", "duration", "questions", "first word", "tokens", "how it ended")]
    for call in records:
        tokens = call["tokens"].get("input", 0) + call["tokens"].get("output", 0)
        rows.append((f"{datetime.fromtimestamp(call['started']):%Y-%m-%d %H:%M:%S}", shown(call["caller"], numbers),
                     call["agent"] or "-", "-" if call["seconds"] is None else f"{call['seconds']:.1f}s",
                     str(len(call["questions"])), "-" if call["first_word"] is None else f"{call['first_word']:.2f}s",
                     f"{tokens:,}" if call["end_reason"] else "-",
                     call["end_reason"] or f"turned away: {call['turned_away']}"))
    widths = [max(map(len, column)) for column in zip(*rows)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    accepted = [call for call in records if not call["turned_away"]]
    tokens = Counter[str]()
    for call in accepted:
        tokens.update(call["tokens"])
    print(f"\n{len(records)} call(s) above: {len(accepted)} accepted, {len(records) - len(accepted)} turned away")
    print("  time to first word ", percentiles([c["first_word"] for c in accepted if c["first_word"] is not None]))
    print("  OpenClaw answers   ",
          percentiles([q["seconds"] for c in accepted for q in c["questions"] if q["outcome"] == "answered"]))
    ends = Counter(row[-1] for row in rows[1:])
    print("  how they ended     ", ", ".join(f"{end} {count}" for end, count in ends.most_common()))
    print(f"  tokens              {tokens['input']:,} input (audio {tokens['input_audio']:,}, cached "
          f"{tokens['input_cached']:,}), {tokens['output']:,} output (audio {tokens['output_audio']:,})")
    print(f"                      what they cost: {PRICING}")


def show_call(call: dict[str, Any], numbers: bool) -> None:
    print(f"call {call['call_id']} from {shown(call['caller'], numbers)}, agent {call['agent'] or '-'}, "
          f"{datetime.fromtimestamp(call['started']):%Y-%m-%d %H:%M:%S} local time ({call['start']})")
    for at, step in call["timeline"]:
        print(f"  {at:8.3f}s  {step}")
    if call["tokens"]:
        print("tokens: " + ", ".join(f"{name} {count:,}" for name, count in call["tokens"].items()))
    if call["pin"] or call["resumed"]:
        print(f"PIN: {call['pin'] or 'off'}{'; resumed after a restart' if call['resumed'] else ''}")
    if call["transcript"]:
        print("transcript:", *(f"  {line}" for line in call["transcript"]), sep="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Phone your OpenClaw assistant through OpenAI Realtime SIP.")
    parser.add_argument("--env-file", metavar="PATH", help="read the settings from this file, not the .env here")
    parser.add_argument("--check", action="store_true", help="check the configuration and both services, then exit")
    parser.add_argument("--ask", metavar="QUESTION", help="ask OpenClaw as a call would, print the answer, exit")
    parser.add_argument("--caller", metavar="NUMBER", help="with --ask: ask as this caller's call would")
    parser.add_argument("--calls", nargs="?", const="", metavar="CALL_ID", help="the last calls, or one's timeline")
    parser.add_argument("--last", type=int, metavar="N", help="with --calls: show the last N calls (default 20)")
    parser.add_argument("--json", action="store_true", help="with --calls: one JSON object per call, every field")
    parser.add_argument("--show-numbers", action="store_true", help="with --calls: show phone numbers in full")
    args = parser.parse_args()
    if args.caller is not None and args.ask is None:
        parser.error("--caller goes with --ask")
    if args.calls is None and (args.json or args.show_numbers or args.last is not None):
        parser.error("--last, --json and --show-numbers go with --calls")
    if args.last is not None and args.last < 1:
        parser.error("--last needs a number of calls, 1 or more")
    journal = stderr_is_journal()
    try:
        # --env-file: the unit's file wins, so a check sees what the service will; or else the .env
        # beside this file (no parent folders) fills in what the environment does not set.
        path = Path(args.env_file or Path(__file__).with_name(".env"))
        try:
            settings, problems = read_settings(path, required=args.env_file is not None)
        except ConfigError as exc:
            if args.check:  # one FAIL: every other row would fail because of it
                print(f"FAIL  the settings file can be read\n      {exc}")
                sys.exit(EX_CONFIG)
            raise
        env = {**os.environ, **settings} if args.env_file else {**settings, **os.environ}
        where = str(path) if path.exists() else f"{path} (copy .env.example there first)"
        config, more = Config.parse(env, args.check or (args.ask is None and args.calls is None), where)
        if args.check:
            sys.exit(asyncio.run(check(config, problems=problems + more)))
        if problems + more:
            raise ConfigError(*problems, *more)
        if args.ask is not None:
            sys.exit(asyncio.run(ask(config, args.ask, args.caller)))
        if args.calls is not None:
            sys.exit(show_history(config, args.calls, args.last or 20, args.json, args.show_numbers))
        handler = logging.StreamHandler()
        handler.setFormatter(JournalFormat("%(levelname)s %(message)s") if journal else
                             logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.basicConfig(level=config.log_level, handlers=[handler])
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        asyncio.run(serve(config))
    except ConfigError as exc:
        print(*(f"{'<3>' * journal}voicebridge: configuration error: {problem}" for problem in exc.args),
              sep="\n", file=sys.stderr)
        sys.exit(EX_CONFIG)
    except StartupError as exc:
        print(f"{'<3>' * journal}voicebridge: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
