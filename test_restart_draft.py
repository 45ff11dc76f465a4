"""Draft: restart recovery through real `python voicebridge.py` processes sharing one STATE_DIR (to merge into
test_voicebridge.py). Process A takes a call and dies (SIGKILL) or stops (SIGTERM); process B starts on the same
STATE_DIR and must pick the call up as PROTOCOL.md section 8 describes: attach again by call_id, replay nothing,
tell the model of a question the restart cut short, keep the call's deadline, PIN state and the PIN lock."""

from test_voicebridge import *  # noqa: F403 (the draft's one link to the suite it will be merged into)

import asyncio
import contextlib
import json
import signal
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import voicebridge
from test_voicebridge import (
    API_KEY, FakeCall, FakeOpenAI, FakeOpenClaw, SECRET, eventually, free_port, incoming_event, make_env, openai,
    openclaw, output_of, run_voicebridge, sign,
)

# Draft only: the star import brings test_voicebridge's own tests along, and pytest would run them all again here.
for _name in [name for name in globals() if name.startswith("test_")]:
    del globals()[_name]


# --- Helpers: a running voicebridge process whose log can be waited on ------------------------------------------


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

    async def deliver(self, call_id: str) -> None:
        """OpenAI's signed realtime.call.incoming webhook for call_id, to this process."""
        body = incoming_event(call_id)
        async with aiohttp.ClientSession() as http, http.post(f"{self.base}/webhook", data=body, headers=sign(body)) as resp:
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
        print(f"--- process {'AB'[number] if number < 2 else number} (port {running.port}) ---\n{running.log}")  # shown on failure


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
    return await eventually(lambda: next((o for o in call.outputs() if o["call_id"] == call_id), None))


def live_calls(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The store's live_calls rows by call_id, read as an operator would: read-only, beside the running service."""
    uri = f"file:{state_dir / 'voicebridge.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        db.row_factory = sqlite3.Row
        return {row["call_id"]: dict(row) for row in db.execute("SELECT * FROM live_calls")}


async def recorded(state_dir: Path, call_id: str, **columns: Any) -> None:
    """Wait until the store's row for call_id has these values (in_flight as a list). A SIGKILL keeps only what the
    store's thread has written, a moment after the event that caused it: the recovery tests kill once the state they
    are about is on disk; test_a_question_is_recorded_before_it_goes_to_openclaw is about that moment."""

    def row() -> dict[str, Any] | None:
        try:
            found = live_calls(state_dir).get(call_id)
        except sqlite3.OperationalError:  # (not created yet)
            return None
        if found is not None:
            found["in_flight"] = json.loads(found["in_flight"])
        return found

    await eventually(lambda: (found := row()) is not None and all(found[k] == v for k, v in columns.items()))


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
    a = await bridges(env)
    call = await call_on(a, openai, "rtc_too_old")
    await recorded(tmp_path / "state", "rtc_too_old")
    await a.kill()
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
    a = await bridges(env)
    call = await call_on(a, openai, "rtc_gone")
    await recorded(tmp_path / "state", "rtc_gone")
    await a.kill()
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


async def test_a_question_is_recorded_before_it_goes_to_openclaw(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    # A slow disk (a slow SD card; here another connection holding the write lock, which stalls the store's thread
    # the same way) may delay the question, never the record. Asked first, a crash before the record lands leaves a
    # question OpenClaw may have acted on that the next process knows nothing of: no RESTARTED output, and the model
    # waits for an output that never comes.
    state_dir = tmp_path / "state"
    a = await bridges(state_env(openai, openclaw, state_dir))
    call = await call_on(a, openai, "rtc_slow_disk")
    await recorded(state_dir, "rtc_slow_disk")
    openclaw.delay = 30
    with contextlib.closing(sqlite3.connect(state_dir / "voicebridge.db", isolation_level=None)) as disk:
        disk.execute("BEGIN IMMEDIATE")  # held well inside the store's busy timeout (5 s): its write waits, not fails
        [pending] = await call.model_response([("ask_openclaw", '{"request": "Cancel my 3 pm"}')])
        await asyncio.sleep(0.5)  # the question would have gone out within milliseconds
        assert openclaw.requests == [], "OpenClaw was asked before the question was recorded"
        disk.execute("ROLLBACK")
    await eventually(lambda: openclaw.requests)  # recorded now: the question goes out
    await recorded(state_dir, "rtc_slow_disk", in_flight=[pending])
    assert questions_asked(openclaw) == ["Cancel my 3 pm"]


async def test_the_silence_clock_starts_again_at_the_resume(
    openai: FakeOpenAI, openclaw: FakeOpenClaw, bridges: Start, tmp_path: Path
) -> None:
    # No process heard the line while the service was down, and the model went on talking with the caller: a resumed
    # call is not "silent since its accept", so B must not open with "are you still there?".
    env = state_env(openai, openclaw, tmp_path / "state", IDLE_SECONDS="10")
    a = await bridges(env)
    call = await call_on(a, openai, "rtc_talking")
    await recorded(tmp_path / "state", "rtc_talking")
    await a.kill()
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
