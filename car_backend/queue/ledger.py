"""The delivery ledger: the one owner of where each task's prediction stands.

    car:tasks:<p>          hash task -> JSON TaskEntry: the task's current model_version, its job keys, its
                           TaskState, the claim's owner and expiry, a reason, and the last delivered
                           (version, keys), which a later annotation is compared with
    car:late:<K>           set of JSON LateRecords waiting on job key K (tasks to write through the API once
                           every key of theirs has a result)
    car:outbox:<p>         hash task -> JSON LateRecord whose jobs all finished: waiting to be written
    car:outbox:due         sorted set: project key -> epoch seconds its outbox is due
    car:outbox:retry       hash project key -> JSON {attempt, since} of its failed writes
    car:outbox:lease:<p>   the one deliverer writing project p's outbox now

A task has one entry per project, holding its newest model_version: the version Label Studio asked for last
(a /predict, or `prelabel --project`). A late record or outbox record of another version planned by the same
label config (entries carry its `config_hash`) is superseded: it is never staged nor written, so two versions
of one task never overwrite each other and the older is never written after the newer. A record of another
label config or other job keys (another image) is a rival, judged on its own: nothing a caller sends can
supersede or block a genuine write, because the Deliverer writes only what Label Studio's own config and
task confirm (queue.delivery). Every change of an entry is one Lua script (`_TRANSITION`), whose mode says
what happens; the states that hold a delivery claim and the claim's owner are its arguments.

A claim (`CLAIMED`: writing, delivered, empty) decides between /predict answering with the result
and a worker writing it through the API: it names the (version, job keys) delivered and lives CLAIM_TTL_S,
so a task whose prediction was deleted in Label Studio can be delivered again when Label Studio asks for it
again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from redis import Redis

from car_backend.pipeline.identity import ProjectId
from car_backend.queue.keys import KeyFamily
from car_backend.queue.results import COMPARE_AND_DELETE

# A delivered (task, version) is not delivered again for this long. It covers every overlap Label Studio can
# produce (a /predict still in flight is cut at ML_TIMEOUT_PREDICT: 100 s by default, 300 s where deployments
# raise it for slow models) and lets a task come back soon after: Label Studio only asks again for a task
# that has no prediction of this version (deleted, or the answer was lost), and then it should get one.
CLAIM_TTL_S = 300


class TaskState(str, Enum):
    """Where a task's prediction of its current model_version stands."""

    LATE = "late"  # registered for writing through the API; some job has no result yet
    STAGED = "staged"  # every job has a result: in the project's outbox
    WRITING = "writing"  # a deliverer holds it: a write in flight, or waiting for its retry
    DELIVERED = "delivered"  # Label Studio has it (answered by /predict, or a write it confirmed)
    EMPTY = "empty"  # delivered as an empty prediction (a permanent failure, or no region)
    PENDING = "pending"  # not delivered: a failure a setting or an outage may change
    DROPPED = "dropped"  # not written: refused by the read-back check, or given up

    @property
    def delivered(self) -> bool:
        return self in (TaskState.DELIVERED, TaskState.EMPTY)


CLAIMED = (TaskState.WRITING, TaskState.DELIVERED, TaskState.EMPTY)


class Outcome(str, Enum):
    """What a ledger transition did: `WON`/`WRITTEN` (the entry now says what was asked), `TAKEN_OVER` (a
    claim of another deliverer was taken), `CLAIMED` (someone holds the claim of this version: lost),
    `SUPERSEDED` (the entry holds another version: nothing changed), `KEPT` (nothing to change)."""

    WON = "won"
    WRITTEN = "written"
    TAKEN_OVER = "taken_over"
    CLAIMED = "claimed"
    SUPERSEDED = "superseded"
    KEPT = "kept"


@dataclass(frozen=True)
class Delivered:
    """The prediction delivered for a task: its model_version and the job keys whose results it holds."""

    version: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class TaskEntry:
    """One task's ledger entry (see the module docstring); `until`: epoch seconds its claim lasts."""

    task: int
    version: str
    keys: tuple[str, ...]
    state: TaskState
    owner: str = ""
    until: float = 0.0
    reason: str = ""
    delivered: Delivered | None = None
    config: str = ""  # config_hash of the label config that planned this version ("" when not known)

    @classmethod
    def from_json(cls, task: int, raw: bytes | str) -> TaskEntry:
        data = json.loads(raw)
        done = data.get("delivered") or None
        return cls(task=task, version=data["version"], keys=tuple(data.get("keys") or ()),
                   state=TaskState(data["state"]), owner=data.get("owner") or "",
                   until=float(data.get("until") or 0), reason=data.get("reason") or "",
                   delivered=Delivered(done["version"], tuple(done.get("keys") or ())) if done else None,
                   config=data.get("config") or "")


@dataclass(frozen=True)
class LateRecord:
    """A task to write through the API once every job key of it has a result.

    `project`: the project whose config planned the jobs; `images`: the task-data references that were
    predicted; `config`: `labelstudio.config.config_hash` of the label config that planned them;
    `sources`: (task-data key the config's Image names, image) per job. All are checked against Label Studio
    (the project's config, the task read back) before anything is written (queue.delivery).
    """

    task: int
    version: str
    keys: tuple[str, ...]
    project: ProjectId
    images: tuple[str, ...] = ()
    config: str = ""
    sources: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> str:
        return json.dumps({"task": self.task, "version": self.version, "keys": list(self.keys),
                           "project": self.project.key, "images": list(self.images), "config": self.config,
                           "sources": [list(s) for s in self.sources]},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> LateRecord:
        """The inverse of `to_json`; ValueError for a record of another shape (an older version's)."""
        data = json.loads(raw)
        try:
            project = ProjectId.from_key(data["project"])
        except (KeyError, TypeError, AttributeError, ValueError):
            raise ValueError("a late record without a project key (written by an older version)") from None
        return cls(task=int(data["task"]), version=data["version"], keys=tuple(data["keys"]), project=project,
                   images=tuple(data.get("images") or ()), config=data.get("config") or "",
                   sources=tuple((str(k), str(i)) for k, i in data.get("sources") or ()))


# KEYS: tasks hash, outbox hash, due zset. ARGV: mode, owner, claim ttl, project key, due, the number n of
# claimed states, the n claimed states, then per task three values: task id, entry JSON (version, keys,
# state, reason, config), late record JSON ("" for none). Returns one Outcome value per task. An outbox field
# is "<task>:<sha1 of the record>": records of rival deliveries of one task wait side by side.
_TRANSITION = """
local mode, owner, ttl, project, due = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local n = tonumber(ARGV[6])
local claimed_states = {}
for i = 7, 6 + n do claimed_states[ARGV[i]] = true end
local t = redis.call('time')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local outcomes = {}

local function transition(task, new, record)
  local raw = redis.call('hget', KEYS[1], task)
  local cur = raw and cjson.decode(raw) or nil
  -- `same`: this very delivery (version and job keys). `newer`: another version planned by the same label
  -- config (a calibration, a head, a setting): it supersedes. Any other entry (another config, another
  -- image) is a rival, judged on its own: Label Studio's config and task decide whether it is written.
  local same = cur ~= nil and cur['version'] == new['version']
    and cjson.encode(cur['keys'] or {}) == cjson.encode(new['keys'])
  local newer = cur ~= nil and cur['version'] ~= new['version'] and (cur['config'] or '') == (new['config'] or '')
  local held = same and claimed_states[cur['state']] and tonumber(cur['until'] or 0) > now
  local slot = task .. ':' .. redis.sha1hex(record)

  local function write(state, claim)
    new['state'] = state
    new['owner'] = claim and owner or ''
    new['until'] = claim and (now + ttl) or 0
    if new['delivered'] == nil and cur ~= nil then new['delivered'] = cur['delivered'] end
    redis.call('hset', KEYS[1], task, cjson.encode(new))
  end
  local function unstage()
    redis.call('hdel', KEYS[2], slot)
  end

  if mode == 'answer' then
    if held then return 'claimed' end
    if #new['keys'] > 0 then new['delivered'] = {version = new['version'], keys = new['keys']} end
    write(new['state'], true)
    return 'won'
  elseif mode == 'register' then
    if held or (same and cur['state'] == 'staged') then return 'kept' end
    write('late', false)
    return 'written'
  elseif mode == 'stage' then
    if newer then return 'superseded' end
    if held then return 'claimed' end
    write('staged', false)
    redis.call('hset', KEYS[2], slot, record)
    redis.call('zadd', KEYS[3], 'NX', due, project)
    return 'written'
  elseif mode == 'deliver' then
    if newer then unstage() return 'superseded' end
    if held and cur['state'] ~= 'writing' then return 'claimed' end
    local other = held and cur['owner'] ~= owner
    write('writing', true)
    if other then return 'taken_over' end
    return 'won'
  elseif mode == 'confirm' then
    unstage()
    if newer then return 'superseded' end
    new['delivered'] = {version = new['version'], keys = new['keys']}
    write('delivered', true)
    return 'won'
  elseif mode == 'settle' then
    unstage()
    if cur ~= nil and not same then return 'superseded' end
    if held and cur['owner'] ~= owner then return 'claimed' end
    write(new['state'], false)
    return 'written'
  elseif mode == 'done' then
    unstage()
    return 'kept'
  end
  return nil
end

for i = 7 + n, #ARGV, 3 do
  local outcome = transition(ARGV[i], cjson.decode(ARGV[i + 1]), ARGV[i + 2])
  if outcome == nil then return redis.error_reply('unknown ledger mode ' .. mode) end
  outcomes[#outcomes + 1] = outcome
end
return outcomes
"""
SCRIPT_CHUNK = 500  # tasks per script call


@dataclass(frozen=True)
class _Item:
    """One task of a ledger transition: the entry it asks for, and the late record concerned (if any)."""

    task: int
    version: str
    keys: Sequence[str]
    state: TaskState = TaskState.LATE
    reason: str = ""
    record: LateRecord | None = None
    config: str = ""


class DeliveryLedger:
    """The key families above for every project; `redis` passed in. `late_ttl`: seconds late records, outboxes
    and entries live without news (CAR_LATE_TTL; entries at least `delivered_ttl`, CAR_RESULT_TTL, so a later
    annotation finds what was delivered). Methods raise RedisError when Redis is unavailable."""

    TASKS = KeyFamily("car:tasks:<p>", "DeliveryLedger",
                      "max(CAR_LATE_TTL, CAR_RESULT_TTL) after the last write; claims CLAIM_TTL_S = 300 s inside")
    LATE = KeyFamily("car:late:<K>", "DeliveryLedger",
                     "CAR_LATE_TTL, renewed on each add and job start; members removed when written or dropped")
    OUTBOX = KeyFamily("car:outbox:<p>", "DeliveryLedger", "CAR_LATE_TTL; fields removed when written or dropped")
    DUE = KeyFamily("car:outbox:due", "DeliveryLedger", "member removed when the outbox is empty")
    RETRY = KeyFamily("car:outbox:retry", "DeliveryLedger", "field removed when the outbox is empty")
    LEASE = KeyFamily("car:outbox:lease:<p>", "DeliveryLedger",
                      "2 x CAR_LS_TIMEOUT + 10 s, renewed before each call to Label Studio")

    def __init__(self, redis: Redis, late_ttl: int = 7 * 24 * 3600, delivered_ttl: int = 7 * 24 * 3600):
        self.redis = redis
        self.late_ttl = max(1, late_ttl)
        self.entry_ttl = max(self.late_ttl, delivered_ttl)
        self._transition = redis.register_script(_TRANSITION)

    # -- entries --

    def _run(self, project: ProjectId, mode: str, items: Iterable[_Item], owner: str = "",
             due: float = 0.0) -> list[Outcome]:
        """Apply `mode` to each item's task of `project` (SCRIPT_CHUNK tasks per script call, one pipeline);
        the outcome of each, in order."""
        items = list(items)
        if not items:
            return []
        keys = [self.TASKS.key(project.key), self.OUTBOX.key(project.key), self.DUE.key()]
        head = [mode, owner, CLAIM_TTL_S, project.key, due, len(CLAIMED), *(s.value for s in CLAIMED)]
        with self.redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(items), SCRIPT_CHUNK):
                args = list(head)
                for item in items[start:start + SCRIPT_CHUNK]:
                    config = item.record.config if item.record is not None else item.config
                    entry = {"version": item.version, "keys": list(item.keys), "state": item.state.value,
                             "reason": item.reason, "config": config}
                    args += [str(item.task), json.dumps(entry), item.record.to_json() if item.record else ""]
                self._transition(keys=keys, args=args, client=pipe)
            pipe.expire(keys[0], self.entry_ttl)
            if mode == "stage":
                pipe.expire(keys[1], self.late_ttl)
            found = pipe.execute()[:-2 if mode == "stage" else -1]
        return [Outcome(o.decode() if isinstance(o, bytes) else o) for chunk in found for o in chunk]

    def answer(self, project: ProjectId, answers: Sequence[tuple[int, str, Sequence[str], TaskState, str]],
               owner: str, config: str = "") -> list[bool]:
        """Claim each (task, version, keys, state, reason) for a /predict answer (state DELIVERED or EMPTY);
        True where this caller won (it then answers with the prediction: the entry says so), False where
        someone holds the claim of that version and those keys (a write in flight, or delivered within
        CLAIM_TTL_S). `config`: the config_hash of the label config that planned them. The claim blocks only
        the same delivery: a write of another version or other keys is judged on its own."""
        outcomes = self._run(project, "answer", (_Item(t, v, k, s, r, config=config) for t, v, k, s, r in answers),
                             owner)
        return [o is Outcome.WON for o in outcomes]

    def settle(self, project: ProjectId, settled: Sequence[tuple[int, str, Sequence[str], TaskState, str]],
               owner: str = "", config: str = "") -> None:
        """Record (task, version, keys, state, reason) with a state that holds no claim (PENDING, DROPPED),
        releasing `owner`'s claim; an entry of another version or other keys, or claimed by someone else, is
        left alone. `config` as in `answer`."""
        self._run(project, "settle", (_Item(t, v, k, s, r, config=config) for t, v, k, s, r in settled), owner)

    def state_of(self, project: ProjectId, tasks: Sequence[int] | None = None) -> dict[int, TaskEntry]:
        """The entries of `tasks` (all of the project's with None) that exist; one Redis call."""
        key = self.TASKS.key(project.key)
        if tasks is None:
            return {int(t): TaskEntry.from_json(int(t), raw) for t, raw in self.redis.hgetall(key).items()}
        tasks = list(tasks)
        if not tasks:
            return {}
        raw = self.redis.hmget(key, [str(t) for t in tasks])
        return {t: TaskEntry.from_json(t, r) for t, r in zip(tasks, raw, strict=True) if r is not None}

    def delivered(self, project: ProjectId, task: int) -> Delivered | None:
        """What was last delivered for `task` (by /predict or through the API), for comparing an annotation."""
        entry = self.state_of(project, [task]).get(task)
        return entry.delivered if entry is not None else None

    # -- late records and the outbox --

    def register_late(self, records: Sequence[LateRecord]) -> None:
        """Have the workers write `records` through the API when their jobs finish: each becomes its task's
        current version (LATE), unless that version is claimed or staged already."""
        with self.redis.pipeline(transaction=False) as pipe:
            for record in records:
                late = self.LATE.key
                for key in record.keys:
                    pipe.sadd(late(key), record.to_json())
                    pipe.expire(late(key), self.late_ttl)
            pipe.execute()
        for project, chunk in _by_project(records).items():
            self._run(project, "register", (_Item(r.task, r.version, r.keys, config=r.config) for r in chunk))

    def touch_late(self, key: str) -> None:
        """Renew the late records waiting on `key` (worker.tasks.segment calls it when the job starts)."""
        self.redis.expire(self.LATE.key(key), self.late_ttl)

    def late(self, key: str) -> list[LateRecord]:
        """The late records waiting on `key`; members an older version wrote (no project key) are removed."""
        found = []
        for raw in self.redis.smembers(self.LATE.key(key)):
            try:
                found.append(LateRecord.from_json(raw))
            except ValueError:
                self.redis.srem(self.LATE.key(key), raw)
        return found

    def stage(self, records: Sequence[LateRecord], due: float) -> list[Outcome]:
        """Put finished `records` in their project's outbox, due at `due` (epoch seconds; a project waiting
        for a retry keeps its later time). Per record: WRITTEN, SUPERSEDED (its task holds another version:
        dropped from the late sets) or CLAIMED (delivered meanwhile: dropped too)."""
        outcomes = []
        for project, chunk in _by_project(records).items():
            found = self._run(project, "stage", (_Item(r.task, r.version, r.keys, record=r) for r in chunk),
                              due=due)
            outcomes.extend(found)
            self._unlate([r for r, o in zip(chunk, found, strict=True) if o is not Outcome.WRITTEN])
        return outcomes

    def pend(self, record: LateRecord, reason: str) -> None:
        """`record`'s jobs ended in a pending failure: it leaves the late sets, and its entry says why."""
        self._unlate([record])
        self.settle(record.project, [(record.task, record.version, record.keys, TaskState.PENDING, reason)],
                    config=record.config)

    def claim_for_delivery(self, record: LateRecord, owner: str) -> Outcome:
        """Take `record`'s claim for an API write by `owner`, who holds the project's outbox lease: WON,
        TAKEN_OVER (another deliverer's, whose write may or may not have reached Label Studio: the caller
        reads the task back before writing), CLAIMED (delivered), SUPERSEDED (another version is current:
        the record left the outbox)."""
        return self._run(record.project, "deliver", [_Item(record.task, record.version, record.keys,
                                                           record=record)], owner)[0]

    def confirm(self, records: Sequence[LateRecord], owner: str) -> None:
        """Label Studio has `records`: delivered (claimed CLAIM_TTL_S), out of the outbox and the late sets."""
        for project, chunk in _by_project(records).items():
            self._run(project, "confirm", (_Item(r.task, r.version, r.keys, record=r) for r in chunk), owner)
        self._unlate(records)

    def drop(self, dropped: Sequence[tuple[LateRecord, str]], owner: str) -> None:
        """The (record, reason) pairs of `dropped` are not written (refused, given up): DROPPED with the reason,
        `owner`'s claim released."""
        reasons = {id(r): why for r, why in dropped}
        for project, chunk in _by_project([r for r, _ in dropped]).items():
            self._run(project, "settle", (_Item(r.task, r.version, r.keys, TaskState.DROPPED, reasons[id(r)], r)
                                          for r in chunk), owner)
        self._unlate([r for r, _ in dropped])

    def done(self, records: Sequence[LateRecord]) -> None:
        """`records` were delivered by someone else: out of the outbox and the late sets, entries unchanged."""
        for project, chunk in _by_project(records).items():
            self._run(project, "done", (_Item(r.task, r.version, r.keys, record=r) for r in chunk))
        self._unlate(records)

    def _unlate(self, records: Sequence[LateRecord]) -> None:
        if not records:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for record in records:
                for key in record.keys:
                    pipe.srem(self.LATE.key(key), record.to_json())
            pipe.execute()

    def outbox(self, project: ProjectId, limit: int) -> list[LateRecord]:
        """Up to `limit` records of the project's outbox, lowest task ids first."""
        raw = self.redis.hgetall(self.OUTBOX.key(project.key))
        records = []
        for task, value in raw.items():
            try:
                records.append(LateRecord.from_json(value))
            except ValueError:
                self.redis.hdel(self.OUTBOX.key(project.key), task)
        return sorted(records, key=lambda r: r.task)[:limit]

    def outbox_size(self, project: ProjectId) -> int:
        return self.redis.hlen(self.OUTBOX.key(project.key))

    def due_projects(self, now: float, instance: str, limit: int = 20) -> list[ProjectId]:
        """Up to `limit` projects of Label Studio `instance` whose outbox is due at `now`; members an older
        version wrote (no project key) are forgotten."""
        found = []
        for raw in self.redis.zrangebyscore(self.DUE.key(), "-inf", now):
            try:
                project = ProjectId.from_key(raw.decode())
            except ValueError:
                self.redis.zrem(self.DUE.key(), raw)
                continue
            if project.instance == instance:
                found.append(project)
                if len(found) >= limit:
                    break
        return found

    def overdue(self, before: float) -> int:
        """How many projects' outboxes were due before `before` (epoch seconds) and are still unwritten: with
        deliverers alive (each looks every few seconds), none stay due for long."""
        return int(self.redis.zcount(self.DUE.key(), "-inf", before))

    def set_due(self, project: ProjectId, due: float | None) -> None:
        """The project's outbox is next due at `due`; None: it is empty (forget it and its retry state)."""
        if due is None:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(self.DUE.key(), project.key)
                pipe.hdel(self.RETRY.key(), project.key)
                pipe.execute()
        else:
            self.redis.zadd(self.DUE.key(), {project.key: due})

    def retry_state(self, project: ProjectId) -> tuple[int, float | None]:
        """(failed tries so far, epoch seconds of the first) of the project's current run of failed writes."""
        raw = self.redis.hget(self.RETRY.key(), project.key)
        if raw is None:
            return 0, None
        data = json.loads(raw)
        return int(data["attempt"]), float(data["since"])

    def put_retry_state(self, project: ProjectId, attempt: int, since: float) -> None:
        self.redis.hset(self.RETRY.key(), project.key, json.dumps({"attempt": attempt, "since": since}))

    # -- the outbox lease --

    def take_lease(self, project: ProjectId, owner: str, ttl: float) -> bool:
        return bool(self.redis.set(self.LEASE.key(project.key), owner, nx=True, px=int(ttl * 1000)))

    def renew_lease(self, project: ProjectId, owner: str, ttl: float) -> bool:
        """Extend the lease if `owner` still holds it; False when it was lost (expired, taken)."""
        return bool(self.redis.eval(_COMPARE_AND_PEXPIRE, 1, self.LEASE.key(project.key), owner, int(ttl * 1000)))

    def release_lease(self, project: ProjectId, owner: str) -> None:
        self.redis.eval(COMPARE_AND_DELETE, 1, self.LEASE.key(project.key), owner)


_COMPARE_AND_PEXPIRE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


def _by_project(records: Iterable[LateRecord]) -> dict[ProjectId, list[LateRecord]]:
    grouped: dict[ProjectId, list[LateRecord]] = {}
    for record in records:
        grouped.setdefault(record.project, []).append(record)
    return grouped

