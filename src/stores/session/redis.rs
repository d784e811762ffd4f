//! The session store on Redis: every multi-step operation is one Lua script, so it is atomic
//! however many worker instances share the server.
//!
//! Keys. Everything of a tenant carries the Redis Cluster hash tag `{t:<tenant>}` (the tenant
//! escaped so it holds no `{`, `}` or `:`), so each script touches one slot:
//! - `nx:{t:T}:conv:<id>`: the [`Conversation`] as JSON.
//! - `nx:{t:T}:tx:<id>`: the transcript, a list of [`Entry`] JSON; position = list index + 1
//!   (the script writes the position RPUSH will give, so stored entries are self-describing).
//! - `nx:{t:T}:txids:<id>`: hash `e:<event id>` / `m:<participant>/<message id>` (an upload's:
//!   `f:`) → position (dedup), and `closed` once the record was saved closed (appends refuse).
//! - `nx:{t:T}:agents`: sorted set of agent ids scored by `idle_since_ms` (the reserve order).
//! - `nx:{t:T}:agent:<id>`: hash: `profile` → a [`PresenceUpdate`] as JSON (written whole by
//!   `update_presence`, swapped whole by `change_presence`), `a:<media>` → conversations held
//!   for that media.
//! - `nx:{t:T}:slots:<agent>`: hash conversation → media of the slot it holds.
//! - `nx:{t:T}:holder:<conversation>`: set of agents whose slot the conversation holds.
//! - `nx:{t:T}:queue:<queue>`: sorted set, score `-priority` (exact for |priority| ≤ 2^53),
//!   member `<at_ms as 16 hex digits, sign bit flipped>|<conversation>`: equal scores sort by
//!   member bytes, so highest priority first, then oldest, then conversation id.
//! - `nx:{t:T}:qidx:<queue>`: hash conversation → its queue member (idempotent enqueue, dequeue).
//!
//! Global keys: `nx:timers:<kind>` (sorted set by due time, member the JSON array
//! `[tenant, id]`), `nx:timer-kinds` (set of the kinds ever scheduled, added to once per kind
//! and process, for a tenant's purge) and `nx:seen:<key>` for [`SessionStore::remember`],
//! `seen` and `forget`; each command or script on them touches that one key. So the store runs
//! on one server or on a Redis Cluster (`stores.redis_cluster`), unchanged.
//!
//! A deleted tenant's purge ([`SessionStore::purge_tenant`]) walks its keys with `SCAN MATCH`
//! on its prefix (on a cluster only on the master of the tenant's slot, which holds them all),
//! never `KEYS`; then the marks of the conversations it found, one key each, and its members of
//! each kind's timers with `ZSCAN MATCH`.
//!
//! `nx` is the namespace (`stores.redis_namespace`): deployments sharing one Redis set their own,
//! or one deployment's workers would fire the other's timers on the wrong bus.
//!
//! Replication. Redis acknowledges a write before its replicas have it, so a master that dies
//! takes its last writes with it, and its replica, promoted, hands their transcript positions
//! out again. With `stores.redis_min_replicas` set, writes go through a connection of their
//! own, each followed by `WAIT` in one pipeline: it answers once that many replicas have the
//! write, and the write fails (its caller retries it, idempotently) if they do not within the
//! wait. Write and `WAIT` go together, to whichever master takes the key (a redirect or a
//! reconnect sends both again), so a `WAIT` never vouches for a write made on another
//! connection. A write answered from what is stored (a retried append answered "duplicate",
//! a reserve of the agent already held) writes nothing, and `WAIT` covers only its own
//! connection's writes: so a small barrier write in the key's slot goes between them, and
//! once a replica has it, it has everything the master applied before, the other
//! connection's write included. `WAIT` holds its connection, so a process's writes to one
//! master wait for replicas one after another; reads keep their own connection.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{
    AsyncCommands, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Script, Value,
};
use async_trait::async_trait;

use super::{
    AgentPresence, Appended, Conversation, ConversationState, Entry, NewEntry, PresenceChange,
    PresenceUpdate, Reserve, SessionStore, StoreError, Timer,
};

/// Time to connect; a store that is down fails fast and the caller retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time for one command or script: every operation is O(agents of a tenant) at most, far below.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Reconnect attempts of the connection manager before an operation fails.
const RECONNECT_RETRIES: usize = 3;
/// Longest wait between those attempts (ms). redis-rs 0.32 grows its wait from 1 s by the
/// `factor` it documents as a unit (redis-rs/redis-rs#1556): its default of 100 makes the second
/// wait a minute, so a store that is down or refuses the handshake (a certificate not trusted)
/// would hold connect and every operation two to four minutes. Capped, attempts are 1–2 s apart
/// (jitter included): a store that refuses fails in seconds, one that drops packets after the
/// attempts' [`CONNECT_TIMEOUT`]s plus those waits (about half a minute).
const RECONNECT_MAX_DELAY_MS: u64 = 1_000;
/// Retries of a cluster request: waits drawn from 250 ms up to a bound doubling to 2.5 s, up
/// to about 16 s in all.
const CLUSTER_RETRIES: u32 = 12;

/// A tenant purge's `SCAN`/`ZSCAN` `COUNT` hint, so also about the most keys one `UNLINK` or
/// `ZREM` of it takes: each call stays short for the server, as `SCAN` is meant to.
const PURGE_BATCH: usize = 1_000;
/// Marks of a purged tenant's conversations deleted at once: each is a key of its own (on a
/// cluster in a slot of its own), so one round trip each, overlapped on the multiplexed
/// connection rather than one after another.
const PURGE_CONCURRENCY: usize = 32;

/// Compare-and-set of a conversation record on its `version`; KEEPTTL so a closed
/// conversation written again keeps expiring. A record saved closed marks the transcript's ids
/// hash `closed` (appends then refuse). A new record, closed or not, ends the expiry its
/// transcript got while it had none (`APPEND`): kept, a record saved closed first would lose its
/// entries and its closed mark (then taking entries again) seven days on, while it stays.
/// KEYS: conv, txids, tx. ARGV: expected version, JSON, closed 1/0.
const PUT_CONVERSATION: &str = r#"
local cur = redis.call('GET', KEYS[1])
local v = 0
if cur then
  local ok, c = pcall(cjson.decode, cur)
  if not ok or type(c) ~= 'table' then return redis.error_reply('NXCORRUPT conversation record') end
  v = tonumber(c['version']) or 0
end
if v ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
if not cur then
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[3])
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[2], 'closed', 1)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
return 1
"#;

/// KEYS: tx, txids, conv. ARGV: event id, the message key (`message_key`) or "", the NewEntry
/// JSON, the orphan TTL ms. Returns {position, 0 new / 1 same event / 2 same message from
/// another event / 3 refused: the conversation is closed}. New keys inherit the record's TTL
/// once it expires, and get the orphan TTL while there is no record (see `PUT_CONVERSATION`).
const APPEND: &str = r#"
local p = redis.call('HGET', KEYS[2], 'e:' .. ARGV[1])
if p then return {tonumber(p), 1} end
if ARGV[2] ~= '' then
  p = redis.call('HGET', KEYS[2], ARGV[2])
  if p then return {tonumber(p), 2} end
end
if redis.call('HEXISTS', KEYS[2], 'closed') == 1 then return {0, 3} end
local pos = redis.call('LLEN', KEYS[1]) + 1
local n = redis.call('RPUSH', KEYS[1], '{"position":' .. pos .. ',' .. string.sub(ARGV[3], 2))
redis.call('HSET', KEYS[2], 'e:' .. ARGV[1], n)
if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], ARGV[2], n) end
local ttl = redis.call('PTTL', KEYS[3])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
elseif ttl == -2 and redis.call('PTTL', KEYS[1]) == -1 then
  -- From the first entry: later ones do not move it.
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return {n, 0}
"#;

/// KEYS: conv, tx, txids. ARGV: ttl ms.
const EXPIRE: &str = r#"
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
return 1
"#;

/// KEYS: agents, agent. ARGV: agent id, profile JSON, ready 1/0, now ms.
/// Returns {idle score, HGETALL agent}.
const SET_PRESENCE: &str = r#"
local old = redis.call('HGET', KEYS[2], 'profile')
local was_ready = false
if old then
  -- An unreadable profile is overwritten: the agent's next state repairs it.
  local ok, p = pcall(cjson.decode, old)
  was_ready = ok and type(p) == 'table' and p.ready == true
end
redis.call('HSET', KEYS[2], 'profile', ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not score) or (ARGV[3] == '1' and not was_ready) then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
  score = ARGV[4]
end
return {score, redis.call('HGETALL', KEYS[2])}
"#;

/// KEYS: agent, agents. ARGV: the profile JSON read, the new one, agent id. Writes only over
/// what was read; returns nil if it did not, else {idle score or nil, HGETALL agent}.
/// The presence is read here, with `agents` declared for it, not by a read after the swap:
/// while a Redis Cluster moves the slot, a swap whose two keys the move has split is refused
/// by Redis (TRYAGAIN, retried by the client) before it writes; that read met TRYAGAIN with
/// the swap already made (failing it if the move outlasted the retries). One round trip less.
const SWAP_PROFILE: &str = r#"
if redis.call('HGET', KEYS[1], 'profile') ~= ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'profile', ARGV[2])
return {redis.call('ZSCORE', KEYS[2], ARGV[3]) or false, redis.call('HGETALL', KEYS[1])}
"#;

/// How often [`SessionStore::change_presence`] reads again after another write came between
/// its read and its write; each such write is an agent's state change, seconds apart.
const SWAP_ATTEMPTS: usize = 8;

/// KEYS: agents, holder, txids. ARGV: key prefix, conversation, media, skills JSON, excluded
/// JSON. Returns the agent id or nil; an error `NXCLOSED` once the conversation is saved closed
/// (its close reads the holders after that save, so a slot taken before is freed by it and none
/// is taken after). The agents' own keys (`agent:`, `slots:`) are built from the
/// prefix, so not declared; they share the tenant's hash tag, hence the slot of KEYS. Scans the
/// tenant's agents in idle order: O(agents of the tenant), stopping at the first that fits.
/// While a Redis Cluster moves the slot, a chosen agent whose keys are not both on the node
/// running it gets `TRYAGAIN` (retried by the cluster client) before anything is written.
const RESERVE: &str = r#"
local prefix, conv, media = ARGV[1], ARGV[2], ARGV[3]
local skills = cjson.decode(ARGV[4])
local excl = {}
for _, a in ipairs(cjson.decode(ARGV[5])) do excl[a] = true end
local only = ARGV[7]
if redis.call('HEXISTS', KEYS[3], 'closed') == 1 then return redis.error_reply('NXCLOSED conversation closed') end
-- A retry finds the slot it took; of several (stale ones), the lowest id, as the embedded store.
local held = redis.call('SMEMBERS', KEYS[2])
table.sort(held)
for _, a in ipairs(held) do
  if not excl[a] and (only == '' or only == a) then return a end
end
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if not excl[id] and (only == '' or only == id) then
    local key = prefix .. 'agent:' .. id
    -- On the source of a slot move an agent's hash already moved is refused (not a TRYAGAIN,
    -- so the client would not retry): answered TRYAGAIN here, nothing written yet. On the
    -- target one not moved yet reads as missing: that agent is passed over.
    local h = redis.pcall('HMGET', key, 'profile', 'a:' .. media)
    if h.err then
      return redis.error_reply('TRYAGAIN agent ' .. id .. ' in a slot being moved')
    end
    if h[1] then
      local ok, p = pcall(cjson.decode, h[1])
      -- An unreadable agent takes no offers; it does not stop the tenant's routing. Nor does
      -- one whose skills or capacity are not a list and a map (JSON null, a number): `ipairs`
      -- or an index on them raises, failing the whole reserve for every conversation.
      if ok and type(p) == 'table' and p.ready == true and type(p.skills) == 'table'
        and type(p.capacity) == 'table' then
        local has = {}
        for _, s in ipairs(p.skills) do has[s] = true end
        local fits = true
        for _, s in ipairs(skills) do
          if not has[s] then fits = false break end
        end
        local cap = tonumber(p.capacity[media] or 0) or 0
        -- A count HINCRBY cannot add to (not an integer) would raise below, after the reserve
        -- chose this agent: passed over as unreadable, its release counts it again.
        local active = 0
        if h[2] then
          active = string.match(h[2], '^%-?%d+$') and #h[2] <= 18 and tonumber(h[2]) or nil
        end
        if fits and active and active < cap then
          local slots = prefix .. 'slots:' .. id
          -- The agent's keys are not in KEYS (any agent may be chosen), so Redis Cluster checks
          -- them only as they are used. While the slot moves between nodes, the source fails an
          -- access to a key already gone, but the target (running this after an ASK) reads a
          -- key not moved yet as missing, and a write would make a second one there (the move
          -- then stops on it, BUSYKEY). A read of both keys in one command is refused by either
          -- node unless both are there (a missing key in a moving slot, so also while the agent
          -- has no slots hash): refused before any write (Lua does not roll back), and answered
          -- TRYAGAIN, as Redis answers a multi-key command in that state, so the client retries.
          local here = redis.pcall('EXISTS', key, slots)
          if type(here) == 'table' and here.err then
            return redis.error_reply('TRYAGAIN agent ' .. id .. ' in a slot being moved')
          end
          redis.call('HINCRBY', key, 'a:' .. media, 1)
          redis.call('ZADD', KEYS[1], ARGV[6], id)
          redis.call('HSET', slots, conv, media)
          redis.call('SADD', KEYS[2], id)
          return id
        end
      end
    end
  end
end
return false
"#;

/// KEYS: agents, agent, slots, holder. ARGV: agent id, conversation, now ms. Returns 1/0.
/// The count decremented is that of the media recorded at reserve. A count that is no integer
/// (damaged) is counted again from the agent's slots, as the embedded store does: HINCRBY
/// would raise after the slot was already freed (Lua does not roll back), leaving the count
/// unreadable for good.
const RELEASE: &str = r#"
local m = redis.call('HGET', KEYS[3], ARGV[2])
if not m then return 0 end
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('SREM', KEYS[4], ARGV[1])
local field = 'a:' .. m
local cur = redis.call('HGET', KEYS[2], field)
if cur and not (string.match(cur, '^%-?%d+$') and #cur <= 18) then
  local n = 0
  for _, media in ipairs(redis.call('HVALS', KEYS[3])) do
    if media == m then n = n + 1 end
  end
  redis.call('HSET', KEYS[2], field, n)
else
  local n = redis.call('HINCRBY', KEYS[2], field, -1)
  if n < 0 then redis.call('HSET', KEYS[2], field, 0) end
end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
return 1
"#;

/// KEYS: queue, qidx. ARGV: conversation, score, member.
const ENQUEUE: &str = r#"
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[3]) == 1 then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
end
return 1
"#;

/// KEYS: queue, qidx. ARGV: conversation. Returns 1 if this call removed it.
const DEQUEUE: &str = r#"
local m = redis.call('HGET', KEYS[2], ARGV[1])
if not m then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('ZREM', KEYS[1], m)
"#;

/// KEYS: timers of a kind. ARGV: now ms, max. Returns the members this call removed.
const CLAIM_DUE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], m) end
return due
"#;

/// Removes a timer only while it is still at its lease score. A lease's score is half a
/// millisecond before its end ([`lease_score`]), which no scheduled due time (whole
/// milliseconds) can be: a timer a handler scheduled again since, even for the very millisecond
/// the lease ends, is kept.
const COMPLETE_TIMER: &str = r#"
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"#;

/// KEYS: claim. ARGV: value, ttl ms. Returns the value held, or nil when this call set it
/// (`SET NX GET` in one step, which Redis before 7.0 lacks).
const CLAIM: &str = r#"
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"#;

struct Scripts {
    put_conversation: Script,
    append: Script,
    expire: Script,
    set_presence: Script,
    swap_profile: Script,
    reserve: Script,
    release: Script,
    enqueue: Script,
    dequeue: Script,
    claim_due: Script,
    complete_timer: Script,
    claim: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            put_conversation: Script::new(PUT_CONVERSATION),
            append: Script::new(APPEND),
            expire: Script::new(EXPIRE),
            set_presence: Script::new(SET_PRESENCE),
            swap_profile: Script::new(SWAP_PROFILE),
            reserve: Script::new(RESERVE),
            release: Script::new(RELEASE),
            enqueue: Script::new(ENQUEUE),
            dequeue: Script::new(DEQUEUE),
            claim_due: Script::new(CLAIM_DUE),
            complete_timer: Script::new(COMPLETE_TIMER),
            claim: Script::new(CLAIM),
        }
    }
}

/// A connection to one server, or to a cluster (which routes each command by its key's slot).
/// Both reconnect by themselves.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How many replicas must have a write before it returns, and how long to wait for them
/// (`stores.redis_min_replicas`, `stores.redis_replica_wait_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaWait {
    pub replicas: u32,
    pub timeout: Duration,
}

/// The connection writes go through: with a replica wait, each command is sent with a `WAIT`
/// behind it in one pipeline (see the module docs).
#[derive(Clone)]
struct Writer {
    conn: Conn,
    wait: Option<ReplicaWait>,
}

impl Writer {
    async fn write_and_wait(&mut self, cmd: &Cmd, wait: ReplicaWait) -> RedisResult<Value> {
        let timeout_ms = u64::try_from(wait.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut pipe = Pipeline::with_capacity(3);
        pipe.add_command(cmd.clone());
        let barrier = barrier_key(cmd).ok_or_else(|| {
            RedisError::from((
                ErrorKind::ClientError,
                "a write through the replica-waiting writer names no key",
            ))
        })?;
        pipe.cmd("SET")
            .arg(barrier)
            .arg(1)
            .arg("PX")
            .arg(BARRIER_TTL_MS);
        pipe.cmd("WAIT").arg(wait.replicas).arg(timeout_ms);
        let mut answers = self.conn.req_packed_commands(&pipe, 0, 3).await?;
        let (Some(acked), Some(_barrier), Some(written)) =
            (answers.pop(), answers.pop(), answers.pop())
        else {
            return Err(RedisError::from((
                ErrorKind::ResponseError,
                "a write with its WAIT got fewer than three answers",
            )));
        };
        // The write's own error (NOSCRIPT, a script's refusal) first, as without the wait.
        let written = written.extract_error()?;
        // An error answer to `WAIT` (a master demoted while it waited, `-UNBLOCKED`; a user
        // without the right, `-NOPERM`) comes as a value on one server: an error, so the write
        // is retried, not a number that does not parse, which reads as corrupt data.
        let acked: i64 = ::redis::from_redis_value(&acked.extract_error().map_err(|e| {
            RedisError::from((
                ErrorKind::ResponseError,
                "WAIT refused",
                format!("{e} (stores.redis_min_replicas)"),
            ))
        })?)?;
        if acked < i64::from(wait.replicas) {
            return Err(RedisError::from((
                ErrorKind::ResponseError,
                "write not replicated",
                format!(
                    "it reached {acked} of the {} replicas asked for within {timeout_ms} ms \
                     (stores.redis_min_replicas)",
                    wait.replicas
                ),
            )));
        }
        Ok(written)
    }
}

impl ConnectionLike for Writer {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self.wait {
            // `SCRIPT LOAD` (a script's first use on a node) writes no data, and alone the
            // cluster client sends it to every master.
            Some(wait) if !is_script_load(cmd) => Box::pin(self.write_and_wait(cmd, wait)),
            _ => self.conn.req_packed_command(cmd),
        }
    }

    /// Writes here are single commands; a pipeline would go unwaited, so none is taken.
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        if self.wait.is_none() {
            return self.conn.req_packed_commands(cmd, offset, count);
        }
        Box::pin(async {
            Err(RedisError::from((
                ErrorKind::ClientError,
                "a pipeline through the replica-waiting writer",
            )))
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// How long a replica-wait barrier key lives: longer than any wait (at most 4 s).
const BARRIER_TTL_MS: u64 = 10_000;

/// The barrier key written between a waited command and its `WAIT`: in the slot of the
/// command's first key (its hash tag, or the whole key as a tag when it has none), so the
/// three go to one master.
fn barrier_key(cmd: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            ::redis::Arg::Simple(b) => Some(b),
            ::redis::Arg::Cursor => None,
        })
        .collect();
    let name = args.first()?;
    let key = if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        let keys: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
        if keys == 0 {
            return None;
        }
        args.get(3)?
    } else {
        args.get(1)?
    };
    let tag = hash_tag(key).unwrap_or(key);
    let mut barrier = Vec::with_capacity(tag.len() + 8);
    barrier.push(b'{');
    barrier.extend_from_slice(tag);
    barrier.extend_from_slice(b"}~wait");
    Some(barrier)
}

/// The hash tag of `key` as Redis Cluster reads it: what is between its first `{` and the
/// next `}`, if that is not empty.
fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let rest = &key[open + 1..];
    let close = rest.iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &rest[..close])
}

fn is_script_load(cmd: &Cmd) -> bool {
    matches!(cmd.args_iter().next(), Some(::redis::Arg::Simple(name)) if name.eq_ignore_ascii_case(b"SCRIPT"))
}

/// What a store connects to, to open its writers' connection.
#[derive(Clone)]
struct Target {
    nodes: Nodes,
    /// PEM CA bundle trusted for `rediss://` instead of the system roots
    /// (`stores.redis_ca_file`).
    ca: Option<Vec<u8>>,
}

#[derive(Clone)]
enum Nodes {
    Single(String),
    Cluster(Vec<String>),
}

/// A [`SessionStore`] on one Redis server or a Redis Cluster (one slot per tenant).
pub struct RedisStore {
    conn: Conn,
    writer: Writer,
    target: Target,
    scripts: Scripts,
    /// First segment of every key: deployments sharing one Redis keep apart by it, timers too.
    namespace: String,
    /// See [`super::ORPHAN_ENTRIES_TTL`].
    orphan_ttl: Duration,
    /// Timer kinds this process added to the `timer-kinds` set (see the module docs).
    timer_kinds: Mutex<HashSet<String>>,
}

/// The namespace of a store connected without one.
pub const DEFAULT_NAMESPACE: &str = "nx";

impl RedisStore {
    /// Connects to `redis://` or `rediss://` (TLS through rustls) under [`DEFAULT_NAMESPACE`];
    /// reconnects by itself.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_in(url, DEFAULT_NAMESPACE).await
    }

    /// [`Self::connect`] with every key under `namespace` (`stores.redis_namespace`).
    pub async fn connect_in(url: &str, namespace: &str) -> Result<Self, StoreError> {
        Self::connect_with_ca(url, namespace, None).await
    }

    /// [`Self::connect_in`] trusting the CA certificates of the PEM bundle `ca` (read from
    /// `stores.redis_ca_file`) instead of the system roots; `rediss://` only.
    pub async fn connect_with_ca(
        url: &str,
        namespace: &str,
        ca: Option<Vec<u8>>,
    ) -> Result<Self, StoreError> {
        let target = Target {
            nodes: Nodes::Single(url.to_string()),
            ca,
        };
        Ok(Self::with(open(&target).await?, target, namespace))
    }

    /// Connects to a Redis Cluster through its `nodes` (`redis://` or `rediss://` URLs of some
    /// of its nodes; the rest are discovered), every key under `namespace`.
    pub async fn connect_cluster_in(nodes: &[&str], namespace: &str) -> Result<Self, StoreError> {
        Self::connect_cluster_with_ca(nodes, namespace, None).await
    }

    /// [`Self::connect_cluster_in`] trusting the CA certificates of the PEM bundle `ca`
    /// instead of the system roots; `rediss://` nodes only.
    pub async fn connect_cluster_with_ca(
        nodes: &[&str],
        namespace: &str,
        ca: Option<Vec<u8>>,
    ) -> Result<Self, StoreError> {
        let target = Target {
            nodes: Nodes::Cluster(nodes.iter().map(|n| n.to_string()).collect()),
            ca,
        };
        Ok(Self::with(open(&target).await?, target, namespace))
    }

    /// Makes every write wait for `wait.replicas` replicas of its master, through a connection
    /// of its own (see the module docs); `None` or 0 replicas: writes share the reads'.
    pub async fn with_replica_wait(
        mut self,
        wait: Option<ReplicaWait>,
    ) -> Result<Self, StoreError> {
        self.writer = match wait.filter(|w| w.replicas > 0) {
            Some(wait) => Writer {
                conn: open(&self.target).await?,
                wait: Some(wait),
            },
            None => Writer {
                conn: self.conn.clone(),
                wait: None,
            },
        };
        Ok(self)
    }

    fn with(conn: Conn, target: Target, namespace: &str) -> Self {
        Self {
            writer: Writer {
                conn: conn.clone(),
                wait: None,
            },
            conn,
            target,
            scripts: Scripts::new(),
            namespace: namespace.to_string(),
            orphan_ttl: super::ORPHAN_ENTRIES_TTL,
            timer_kinds: Mutex::new(HashSet::new()),
        }
    }

    /// Keeps entries of a conversation without a record `ttl` instead of
    /// [`super::ORPHAN_ENTRIES_TTL`] (tests).
    pub fn with_orphan_ttl(mut self, ttl: Duration) -> Self {
        self.orphan_ttl = ttl;
        self
    }

    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Where writes go ([`Writer`]).
    fn writer(&self) -> Writer {
        self.writer.clone()
    }

    fn prefix(&self, tenant: &str) -> String {
        tenant_prefix(&self.namespace, tenant)
    }

    fn key(&self, tenant: &str, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix(tenant))
    }

    /// Timers are global to a deployment (any worker of it may fire them), not to Redis.
    fn timers_key(&self, kind: &str) -> String {
        format!("{}:timers:{kind}", self.namespace)
    }

    /// A remembered key (effect dedup, start marks): global to the deployment like timers.
    fn seen_key(&self, key: &str) -> String {
        format!("{}:seen:{key}", self.namespace)
    }

    fn claim_key(&self, key: &str) -> String {
        format!("{}:claim:{key}", self.namespace)
    }

    /// The set of timer kinds ever scheduled, which a tenant's purge goes through.
    fn timer_kinds_key(&self) -> String {
        format!("{}:timer-kinds", self.namespace)
    }

    /// Adds `kind` to the timer kinds, once per process: a timer's schedule costs one round
    /// trip more only the first time its kind is used.
    async fn register_timer_kind(&self, kind: &str) -> Result<(), StoreError> {
        let known = self
            .timer_kinds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(kind);
        if known {
            return Ok(());
        }
        self.writer()
            .sadd::<_, _, ()>(self.timer_kinds_key(), kind)
            .await
            .map_err(redis_err)?;
        self.timer_kinds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(kind.to_string());
        Ok(())
    }

    /// One `SCAN` step over the keys of `tenant`: on a cluster, on the master of the tenant's
    /// slot (`SCAN` is a per-node command; every key of the tenant is in that slot).
    async fn scan_tenant(
        &self,
        tenant: &str,
        cursor: u64,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let prefix = self.prefix(tenant);
        let mut cmd = ::redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(format!("{}*", glob_escape(&prefix)))
            .arg("COUNT")
            .arg(PURGE_BATCH);
        let answer = match self.conn() {
            Conn::Single(mut c) => c.req_packed_command(&cmd).await,
            Conn::Cluster(mut c) => {
                if cursor == 0 {
                    // `SCAN` names no key, so no node answers it MOVED: sent by a slot map
                    // that a reshard made stale, it would walk the slot's old master, find
                    // nothing, and the purge would pass for done. A command on a key of the
                    // slot first follows any redirect and refreshes the map.
                    ::redis::cmd("EXISTS")
                        .arg(format!("{prefix}conv"))
                        .query_async::<i64>(&mut c)
                        .await
                        .map_err(redis_err)?;
                }
                let route = Route::new(key_slot(prefix.as_bytes()), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                c.route_command(&cmd, routing).await
            }
        };
        ::redis::from_redis_value(&answer.map_err(redis_err)?).map_err(redis_err)
    }

    /// Deletes the tenant's members of the `kind` timers; how many.
    async fn purge_timers(&self, tenant: &str, kind: &str) -> Result<u64, StoreError> {
        let key = self.timers_key(kind);
        let pattern = format!("{}*", glob_escape(&timer_member_prefix(tenant)?));
        let (mut cursor, mut removed) = (0u64, 0u64);
        loop {
            // Members and scores, alternately.
            let (next, found): (u64, Vec<String>) = ::redis::cmd("ZSCAN")
                .arg(&key)
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(PURGE_BATCH)
                .query_async(&mut self.conn())
                .await
                .map_err(redis_err)?;
            let members: Vec<&String> = found.iter().step_by(2).collect();
            if !members.is_empty() {
                removed += self
                    .writer()
                    .zrem::<_, _, u64>(&key, members)
                    .await
                    .map_err(redis_err)?;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}

/// A connection to `target`, reconnecting by itself.
async fn open(target: &Target) -> Result<Conn, StoreError> {
    crate::tls::install_crypto_provider();
    let certs = |ca: &Vec<u8>| ::redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.clone()),
    };
    match &target.nodes {
        Nodes::Single(url) => {
            let client = match &target.ca {
                Some(ca) => ::redis::Client::build_with_tls(url.as_str(), certs(ca)),
                None => ::redis::Client::open(url.as_str()),
            }
            .map_err(unavailable)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(RESPONSE_TIMEOUT)
                .set_number_of_retries(RECONNECT_RETRIES)
                .set_factor(2)
                .set_max_delay(RECONNECT_MAX_DELAY_MS);
            let conn = client
                .get_connection_manager_with_config(config)
                .await
                .map_err(unavailable)?;
            Ok(Conn::Single(conn))
        }
        Nodes::Cluster(nodes) => {
            let mut builder = ClusterClientBuilder::new(nodes.clone());
            if let Some(ca) = &target.ca {
                builder = builder.certs(certs(ca));
            }
            let client = builder
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                // A failover takes the cluster's node timeout (15 s by default): retried
                // (MOVED, ASK, CLUSTERDOWN, TRYAGAIN, a lost connection) for about as long.
                .retries(CLUSTER_RETRIES)
                .min_retry_wait(250)
                .max_retry_wait(2_500)
                .build()
                .map_err(unavailable)?;
            let conn = client.get_async_connection().await.map_err(unavailable)?;
            Ok(Conn::Cluster(conn))
        }
    }
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Data errors (our scripts' `NXCORRUPT`, a key of the wrong type, an unparsable reply) are
/// [`StoreError::Corrupt`]; everything else is worth a retry.
fn redis_err(e: RedisError) -> StoreError {
    let corrupt = matches!(e.kind(), ErrorKind::TypeError)
        || matches!(e.code(), Some("NXCORRUPT") | Some("WRONGTYPE"));
    if corrupt {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// The tenant inside a hash tag and a key segment: no `{`, `}` or `:` left, so distinct
/// tenants give distinct prefixes and the tag is always the whole tenant.
fn escape_tenant(tenant: &str) -> String {
    let mut out = String::with_capacity(tenant.len());
    for c in tenant.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            ':' => out.push_str("%3A"),
            c => out.push(c),
        }
    }
    out
}

/// `<namespace>:{t:<tenant>}:`: the prefix of every key of a tenant.
fn tenant_prefix(namespace: &str, tenant: &str) -> String {
    format!("{namespace}:{{t:{}}}:", escape_tenant(tenant))
}

/// `s` matched literally in a `SCAN MATCH` pattern: the glob characters escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (of the key when it has
/// none) modulo 16384, as the cluster spec defines it.
fn key_slot(key: &[u8]) -> u16 {
    let tag = hash_tag(key).unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tag {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

/// What every timer member of `tenant` starts with: `["<tenant>",` (see [`timer_member`]).
fn timer_member_prefix(tenant: &str) -> Result<String, StoreError> {
    let quoted = serde_json::to_string(tenant).map_err(|e| corrupt("timer member", e))?;
    Ok(format!("[{quoted},"))
}

/// The score of a timer claimed at `now_ms` (see `COMPLETE_TIMER`): half a millisecond before
/// its lease ends, so a claim at the lease's end takes it, as a whole-millisecond score would.
fn lease_score(now_ms: i64) -> String {
    format!("{}.5", super::timer_lease_until(now_ms).saturating_sub(1))
}

fn timer_member(timer: &Timer) -> Result<String, StoreError> {
    serde_json::to_string(&(&timer.tenant_id, &timer.id)).map_err(|e| corrupt("timer member", e))
}

/// Orders highest priority first: scores sort ascending.
fn queue_score(priority: i64) -> f64 {
    -(priority as f64)
}

/// `<at_ms, sign bit flipped, 16 hex digits>|<conversation>`: byte order is time order.
fn queue_member(at_ms: i64, conversation_id: &str) -> String {
    format!("{:016x}|{conversation_id}", (at_ms as u64) ^ (1 << 63))
}

fn queue_member_conversation(member: &str) -> Result<String, StoreError> {
    member
        .get(17..)
        .map(str::to_string)
        .ok_or_else(|| StoreError::Corrupt(format!("queue member `{member}`")))
}

/// The presence read from the idle score (if the agent has one) and the agent hash's fields.
fn read_presence(
    tenant: &str,
    agent_id: &str,
    score: Option<String>,
    fields: Vec<(String, String)>,
) -> Result<Option<AgentPresence>, StoreError> {
    match score {
        Some(score) => parse_presence(tenant, agent_id, &score, fields),
        None if fields.is_empty() => Ok(None),
        None => Err(StoreError::Corrupt(format!(
            "agent {agent_id} has a record but no idle time"
        ))),
    }
}

/// Builds the presence from the idle score and the agent hash's fields.
fn parse_presence(
    tenant: &str,
    agent_id: &str,
    score: &str,
    fields: Vec<(String, String)>,
) -> Result<Option<AgentPresence>, StoreError> {
    let mut profile = None;
    let mut active = BTreeMap::new();
    for (field, value) in fields {
        if field == "profile" {
            let p: PresenceUpdate =
                serde_json::from_str(&value).map_err(|e| corrupt("agent profile", e))?;
            profile = Some(p);
        } else if let Some(media) = field.strip_prefix("a:") {
            let n: u32 = value
                .parse()
                .map_err(|e| corrupt("agent active count", e))?;
            if n > 0 {
                active.insert(media.to_string(), n);
            }
        }
    }
    let Some(profile) = profile else {
        return Ok(None);
    };
    let idle: f64 = score.parse().map_err(|e| corrupt("agent idle score", e))?;
    if !idle.is_finite() {
        return Err(StoreError::Corrupt(format!("agent idle score {score}")));
    }
    Ok(Some(AgentPresence {
        tenant_id: tenant.to_string(),
        agent_id: agent_id.to_string(),
        ready: profile.ready,
        skills: profile.skills,
        capacity: profile.capacity,
        active,
        idle_since_ms: idle as i64,
        limits: profile.limits,
    }))
}

fn ttl_ms(ttl: Duration) -> u64 {
    // PEXPIRE/PX refuse 0; a zero TTL means "gone at once", which 1 ms gives.
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn put_conversation(&self, c: &Conversation) -> Result<bool, StoreError> {
        let stored = Conversation {
            version: super::next_version(c)?,
            ..c.clone()
        };
        let json = serde_json::to_string(&stored).map_err(|e| corrupt("conversation", e))?;
        let written: i64 = self
            .scripts
            .put_conversation
            .key(self.key(&c.tenant_id, "conv", &c.conversation_id))
            .key(self.key(&c.tenant_id, "txids", &c.conversation_id))
            .key(self.key(&c.tenant_id, "tx", &c.conversation_id))
            .arg(c.version)
            .arg(json)
            .arg(u8::from(c.state == ConversationState::Closed))
            .invoke_async(&mut self.writer())
            .await
            .map_err(redis_err)?;
        Ok(written == 1)
    }

    async fn conversation(
        &self,
        tenant: &str,
        conversation_id: &str,
    ) -> Result<Option<Conversation>, StoreError> {
        let json: Option<String> = self
            .conn()
            .get(self.key(tenant, "conv", conversation_id))
            .await
            .map_err(redis_err)?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| corrupt("conversation", e)))
            .transpose()
    }

    async fn expire_conversation(
        &self,
        tenant: &str,
        conversation_id: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.scripts
            .expire
            .key(self.key(tenant, "conv", conversation_id))
            .key(self.key(tenant, "tx", conversation_id))
            .key(self.key(tenant, "txids", conversation_id))
            .arg(ttl_ms(ttl))
            .invoke_async::<()>(&mut self.writer())
            .await
            .map_err(redis_err)
    }

    async fn append(
        &self,
        tenant: &str,
        conversation_id: &str,
        entry: &NewEntry,
    ) -> Result<Appended, StoreError> {
        let json = serde_json::to_string(entry).map_err(|e| corrupt("entry", e))?;
        let message = super::message_key(entry).unwrap_or_default();
        let (position, duplicate): (u64, u8) = self
            .scripts
            .append
            .key(self.key(tenant, "tx", conversation_id))
            .key(self.key(tenant, "txids", conversation_id))
            .key(self.key(tenant, "conv", conversation_id))
            .arg(&entry.event_id)
            .arg(message)
            .arg(json)
            .arg(ttl_ms(self.orphan_ttl))
            .invoke_async(&mut self.writer())
            .await
            .map_err(redis_err)?;
        if duplicate == 3 {
            return Err(StoreError::Closed(conversation_id.to_string()));
        }
        Ok(Appended {
            position,
            duplicate: duplicate > 0,
            retried: duplicate == 2,
        })
    }

    async fn transcript_len(&self, tenant: &str, conversation_id: &str) -> Result<u64, StoreError> {
        self.conn()
            .llen(self.key(tenant, "tx", conversation_id))
            .await
            .map_err(redis_err)
    }

    async fn transcript(
        &self,
        tenant: &str,
        conversation_id: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let start = from.max(1) - 1;
        let Ok(start) = isize::try_from(start) else {
            return Ok(Vec::new());
        };
        // A larger window than a list can hold means "to the end".
        let stop = start.saturating_add(isize::try_from(max).unwrap_or(isize::MAX) - 1);
        let items: Vec<String> = self
            .conn()
            .lrange(self.key(tenant, "tx", conversation_id), start, stop)
            .await
            .map_err(redis_err)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let entry: Entry = serde_json::from_str(item).map_err(|e| corrupt("entry", e))?;
            let want = start as u64 + i as u64 + 1;
            if entry.position != want {
                return Err(StoreError::Corrupt(format!(
                    "transcript of {conversation_id}: entry at {want} says position {}",
                    entry.position
                )));
            }
            out.push(entry);
        }
        Ok(out)
    }

    async fn update_presence(
        &self,
        tenant: &str,
        agent_id: &str,
        update: &PresenceUpdate,
        now_ms: i64,
    ) -> Result<AgentPresence, StoreError> {
        let ready = update.ready;
        let profile = serde_json::to_string(update).map_err(|e| corrupt("agent profile", e))?;
        let (score, fields): (String, Vec<(String, String)>) = self
            .scripts
            .set_presence
            .key(format!("{}agents", self.prefix(tenant)))
            .key(self.key(tenant, "agent", agent_id))
            .arg(agent_id)
            .arg(profile)
            .arg(if ready { "1" } else { "0" })
            .arg(now_ms)
            .invoke_async(&mut self.writer())
            .await
            .map_err(redis_err)?;
        parse_presence(tenant, agent_id, &score, fields)?
            .ok_or_else(|| StoreError::Corrupt(format!("agent {agent_id} lost its profile")))
    }

    async fn presence(
        &self,
        tenant: &str,
        agent_id: &str,
    ) -> Result<Option<AgentPresence>, StoreError> {
        let (score, fields): (Option<String>, Vec<(String, String)>) = ::redis::pipe()
            .atomic()
            .zscore(format!("{}agents", self.prefix(tenant)), agent_id)
            .hgetall(self.key(tenant, "agent", agent_id))
            .query_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        read_presence(tenant, agent_id, score, fields)
    }

    async fn change_presence(
        &self,
        tenant: &str,
        agent_id: &str,
        change: &PresenceChange,
    ) -> Result<Option<AgentPresence>, StoreError> {
        let key = self.key(tenant, "agent", agent_id);
        for _ in 0..SWAP_ATTEMPTS {
            let read: Option<String> =
                self.conn().hget(&key, "profile").await.map_err(redis_err)?;
            let Some(read) = read else {
                return Ok(None);
            };
            let mut profile: PresenceUpdate =
                serde_json::from_str(&read).map_err(|e| corrupt("agent profile", e))?;
            change.apply(&mut profile);
            let written =
                serde_json::to_string(&profile).map_err(|e| corrupt("agent profile", e))?;
            let swapped: Option<(Option<String>, Vec<(String, String)>)> = self
                .scripts
                .swap_profile
                .key(&key)
                .key(format!("{}agents", self.prefix(tenant)))
                .arg(read)
                .arg(written)
                .arg(agent_id)
                .invoke_async(&mut self.writer())
                .await
                .map_err(redis_err)?;
            if let Some((score, fields)) = swapped {
                return read_presence(tenant, agent_id, score, fields);
            }
        }
        Err(StoreError::Unavailable(format!(
            "agent {agent_id}: its presence kept changing"
        )))
    }

    async fn reserve_agent(&self, tenant: &str, r: &Reserve) -> Result<Option<String>, StoreError> {
        let skills = serde_json::to_string(&r.skills).map_err(|e| corrupt("skills", e))?;
        let exclude = serde_json::to_string(&r.exclude).map_err(|e| corrupt("exclude", e))?;
        let pre = self.prefix(tenant);
        self.scripts
            .reserve
            .key(format!("{pre}agents"))
            .key(self.key(tenant, "holder", &r.conversation_id))
            .key(self.key(tenant, "txids", &r.conversation_id))
            .arg(&pre)
            .arg(&r.conversation_id)
            .arg(&r.media)
            .arg(skills)
            .arg(exclude)
            .arg(r.now_ms)
            .arg(r.only.as_deref().unwrap_or(""))
            .invoke_async(&mut self.writer())
            .await
            .map_err(|e| match e.code() {
                Some("NXCLOSED") => StoreError::Closed(r.conversation_id.clone()),
                _ => redis_err(e),
            })
    }

    async fn release_agent(
        &self,
        tenant: &str,
        agent_id: &str,
        _media: &str,
        conversation_id: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let released: u8 = self
            .scripts
            .release
            .key(format!("{}agents", self.prefix(tenant)))
            .key(self.key(tenant, "agent", agent_id))
            .key(self.key(tenant, "slots", agent_id))
            .key(self.key(tenant, "holder", conversation_id))
            .arg(agent_id)
            .arg(conversation_id)
            .arg(now_ms)
            .invoke_async(&mut self.writer())
            .await
            .map_err(redis_err)?;
        Ok(released == 1)
    }

    async fn slot_holders(
        &self,
        tenant: &str,
        conversation_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self
            .conn()
            .smembers(self.key(tenant, "holder", conversation_id))
            .await
            .map_err(redis_err)?;
        ids.sort();
        Ok(ids)
    }

    async fn agent_conversations(
        &self,
        tenant: &str,
        agent_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self
            .conn()
            .hkeys(self.key(tenant, "slots", agent_id))
            .await
            .map_err(redis_err)?;
        ids.sort();
        Ok(ids)
    }

    async fn enqueue(
        &self,
        tenant: &str,
        queue_id: &str,
        conversation_id: &str,
        priority: i64,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.scripts
            .enqueue
            .key(self.key(tenant, "queue", queue_id))
            .key(self.key(tenant, "qidx", queue_id))
            .arg(conversation_id)
            .arg(queue_score(priority))
            .arg(queue_member(at_ms, conversation_id))
            .invoke_async::<()>(&mut self.writer())
            .await
            .map_err(redis_err)
    }

    async fn dequeue(
        &self,
        tenant: &str,
        queue_id: &str,
        conversation_id: &str,
    ) -> Result<bool, StoreError> {
        let removed: u8 = self
            .scripts
            .dequeue
            .key(self.key(tenant, "queue", queue_id))
            .key(self.key(tenant, "qidx", queue_id))
            .arg(conversation_id)
            .invoke_async(&mut self.writer())
            .await
            .map_err(redis_err)?;
        Ok(removed == 1)
    }

    async fn waiting(
        &self,
        tenant: &str,
        queue_id: &str,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let stop = isize::try_from(max - 1).unwrap_or(isize::MAX);
        let members: Vec<String> = self
            .conn()
            .zrange(self.key(tenant, "queue", queue_id), 0, stop)
            .await
            .map_err(redis_err)?;
        members
            .iter()
            .map(|m| queue_member_conversation(m))
            .collect()
    }

    async fn schedule(&self, timer: &Timer, due_ms: i64) -> Result<(), StoreError> {
        self.register_timer_kind(&timer.kind).await?;
        self.writer()
            .zadd::<_, _, _, ()>(self.timers_key(&timer.kind), timer_member(timer)?, due_ms)
            .await
            .map_err(redis_err)
    }

    async fn cancel(&self, timer: &Timer) -> Result<(), StoreError> {
        self.writer()
            .zrem::<_, _, ()>(self.timers_key(&timer.kind), timer_member(timer)?)
            .await
            .map_err(redis_err)
    }

    async fn claim_due(
        &self,
        kind: &str,
        now_ms: i64,
        max: usize,
    ) -> Result<Vec<Timer>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // Not through the writer: a lease lost with its master only makes its timers due
        // again, and a timer fired twice is harmless (each checks the record it is for).
        let members: Vec<String> = self
            .scripts
            .claim_due
            .key(self.timers_key(kind))
            .arg(now_ms)
            .arg(max)
            .arg(lease_score(now_ms))
            .invoke_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        let mut timers = Vec::with_capacity(members.len());
        for m in &members {
            match serde_json::from_str::<(String, String)>(m) {
                Ok((tenant_id, id)) => timers.push(Timer {
                    kind: kind.to_string(),
                    tenant_id,
                    id,
                }),
                // Leased with the rest by the script: failing the batch would hold every good
                // timer in it for a lease, again and again. The bad one goes.
                Err(e) => {
                    tracing::warn!(kind, member = %m, error = %e, "an unreadable timer removed");
                    self.conn()
                        .zrem::<_, _, ()>(self.timers_key(kind), m)
                        .await
                        .map_err(redis_err)?;
                }
            }
        }
        Ok(timers)
    }

    async fn complete_timer(&self, timer: &Timer, now_ms: i64) -> Result<(), StoreError> {
        self.scripts
            .complete_timer
            .key(self.timers_key(&timer.kind))
            .arg(timer_member(timer)?)
            .arg(lease_score(now_ms))
            .invoke_async::<()>(&mut self.writer())
            .await
            .map_err(redis_err)
    }

    async fn remember(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let set: Value = ::redis::cmd("SET")
            .arg(self.seen_key(key))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms(ttl))
            .query_async(&mut self.writer())
            .await
            .map_err(redis_err)?;
        Ok(!matches!(set, Value::Nil))
    }

    async fn claim(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        self.scripts
            .claim
            .key(self.claim_key(key))
            .arg(value)
            .arg(ttl_ms(ttl))
            .invoke_async::<Option<String>>(&mut self.writer())
            .await
            .map_err(redis_err)
    }

    async fn refresh(&self, key: &str, ttl: Duration) -> Result<(), StoreError> {
        ::redis::cmd("SET")
            .arg(self.seen_key(key))
            .arg(1)
            .arg("PX")
            .arg(ttl_ms(ttl))
            .query_async::<()>(&mut self.writer())
            .await
            .map_err(redis_err)
    }

    async fn seen(&self, key: &str) -> Result<bool, StoreError> {
        ::redis::cmd("EXISTS")
            .arg(self.seen_key(key))
            .query_async::<bool>(&mut self.conn())
            .await
            .map_err(redis_err)
    }

    async fn forget(&self, key: &str) -> Result<(), StoreError> {
        ::redis::cmd("DEL")
            .arg(self.seen_key(key))
            .query_async::<()>(&mut self.writer())
            .await
            .map_err(redis_err)
    }

    async fn purge_tenant(&self, tenant: &str) -> Result<u64, StoreError> {
        use futures::{StreamExt, TryStreamExt};
        let prefix = self.prefix(tenant);
        let mut removed = 0u64;
        let mut conversations = HashSet::new();
        let mut cursor = 0u64;
        loop {
            let (next, keys) = self.scan_tenant(tenant, cursor).await?;
            for key in &keys {
                let named = key.strip_prefix(&prefix).and_then(|k| k.split_once(':'));
                if let Some(("conv" | "tx" | "txids" | "holder", id)) = named {
                    conversations.insert(id.to_string());
                }
            }
            if !keys.is_empty() {
                // One slot (the tenant's hash tag), so one command on a cluster too.
                removed += ::redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<u64>(&mut self.writer())
                    .await
                    .map_err(redis_err)?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // The marks are global keys (the edge and the worker name them by tenant and
        // conversation), so they go by the conversations found.
        let marks: Vec<String> = conversations
            .iter()
            .flat_map(|c| {
                [
                    super::start_mark(tenant, c),
                    super::customer_mark(tenant, c),
                ]
            })
            .map(|k| self.seen_key(&k))
            .collect();
        removed += futures::stream::iter(marks)
            .map(|key| async move {
                ::redis::cmd("UNLINK")
                    .arg(key)
                    .query_async::<u64>(&mut self.writer())
                    .await
                    .map_err(redis_err)
            })
            .buffer_unordered(PURGE_CONCURRENCY)
            .try_fold(0, |sum, n| async move { Ok(sum + n) })
            .await?;
        let kinds: Vec<String> = self
            .conn()
            .smembers(self.timer_kinds_key())
            .await
            .map_err(redis_err)?;
        for kind in kinds {
            removed += self.purge_timers(tenant, &kind).await?;
        }
        Ok(removed)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A read routed by its key: on a cluster, PING would go to every master and fail with
        // any one of them, taking every pod out of service for one shard.
        ::redis::cmd("EXISTS")
            .arg(format!("{}:ping", self.namespace))
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(redis_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_cannot_forge_each_others_keys() {
        let key = |tenant: &str, id: &str| format!("{}conv:{id}", tenant_prefix("nx", tenant));
        assert_ne!(key("a}:conv:x", "y"), key("a", "x}:conv:y"));
        assert_eq!(key("t{1}", "c"), "nx:{t:t%7B1%7D}:conv:c");
        assert_ne!(tenant_prefix("nx", "t"), tenant_prefix("nx2", "t"));
    }

    /// The slots `CLUSTER KEYSLOT` answers (Redis Cluster spec and command docs).
    #[test]
    fn key_slots_follow_the_cluster_spec() {
        // The CRC16/XMODEM check value, below 16384.
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"somekey"), 11_058);
        assert_eq!(key_slot(b"foo{hash_tag}"), 2_515);
        assert_eq!(key_slot(b"hash_tag"), 2_515);
        let prefix = tenant_prefix("nx", "t-1");
        assert_eq!(
            key_slot(format!("{prefix}conv:c").as_bytes()),
            key_slot(b"t:t-1")
        );
    }

    #[test]
    fn purge_patterns_match_only_their_tenant() {
        assert_eq!(glob_escape("nx:{t:a*[b]?}:"), "nx:{t:a\\*\\[b\\]\\?}:");
        assert_eq!(timer_member_prefix("t\"x").expect("prefix"), "[\"t\\\"x\",");
        let member = timer_member(&Timer {
            kind: "k".into(),
            tenant_id: "t-1".into(),
            id: "c".into(),
        })
        .expect("member");
        assert!(member.starts_with(&timer_member_prefix("t-1").expect("prefix")));
        assert!(!member.starts_with(&timer_member_prefix("t-").expect("prefix")));
    }

    #[test]
    fn data_errors_are_corrupt_others_unavailable() {
        let parse = RedisError::from((ErrorKind::TypeError, "not a number"));
        assert!(matches!(redis_err(parse), StoreError::Corrupt(_)));
        let io = RedisError::from(std::io::Error::other("reset"));
        assert!(matches!(redis_err(io), StoreError::Unavailable(_)));
    }

    #[test]
    fn queue_members_sort_by_time() {
        let mut members = [
            queue_member(5, "b"),
            queue_member(-3, "z"),
            queue_member(5, "a"),
            queue_member(1_700_000_000_000, "c"),
        ];
        members.sort();
        let ids: Vec<String> = members
            .iter()
            .map(|m| queue_member_conversation(m).expect("member"))
            .collect();
        assert_eq!(ids, ["z", "a", "b", "c"]);
    }
}
