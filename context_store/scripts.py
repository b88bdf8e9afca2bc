"""Lua scripts: every context-store write is one atomic script in Redis.

The hybrid logical clock lives in Redis (`hlc` key) so every writer of a site
shares it: hlc = max(now_ms * 1000, last + 1) for a local event, and also
above the remote timestamp for a received one. Timestamps stay under 2^53 (Lua
numbers are doubles) and are formatted with %.0f, never tostring.

Every document script takes the same keys, in the order of DOC_KEYS, and names them
in its first line (DOC_PREAMBLE); the log scripts the same with LOG_KEYS. A Redis
script does not roll back: each one checks what can fail before it writes, and
records what it holds of another site's numbering (below) last.
"""

# Documents: which versions are conflicts is decided by causality, not arrival order.
# Every version names the version(s) it replaced (`base`: 'hlc|site', comma-separated
# for a resolution that replaces several). A version some other known version
# replaced is superseded (`gone`); the rest are the heads. The current version is the
# head with the greatest (hlc, site); every other head is a conflict record, whose
# winner is the current one. That is a function of the set of versions alone, so
# every site that has seen the same versions holds the same current version and the
# same conflict records, whatever order they arrived in (a successor may arrive
# before the version it replaced: `gone` remembers it).
#
# Per document: heads (set of ids), gone (set), known (set), vers (hash id -> the
# version as JSON), old (sorted set of the superseded versions held, by hlc then id:
# (hlc, site) order), tomb (hash id -> base of this site's own versions the retention
# dropped), dconf (set of its conflict record keys), hist (this site's record of its
# current version's changes: local number and id). A store from before this layout
# is taken over the first time a document is touched: its current version and its
# conflict records become heads.
#
# History is `vers`, trimmed: beyond `keep` superseded versions, the oldest by
# (hlc, site) are dropped (never a head: the current version and every conflict
# record stay). Superseded is forever and the rule looks only at the set of versions,
# so sites that hold the same versions keep the same ones. Ids stay in `known` and
# `gone`, so a dropped version that arrives again is not taken back; and a dropped
# version of this site's own keeps its base (`tomb`), so catch-up can still tell the
# other site what it superseded.
#
# Numbering: each of a site's own changes (a version it wrote, a log entry) gets the
# next number of its `own-count` counter, indexed in `own` (member 'doc|NAME|ID' or
# 'log|ENTRY_ID', score seq) and carried in its event with the numbering's name: the
# run id of the Redis process that gave it. A restarted Redis may have lost its last
# changes (an AOF without fsync, a restored backup) and so give a number again; its
# new name tells the other sites to ask for everything once more. A site that applies
# another's changes records which numbers of the named numbering it holds: `got`
# (origin -> n, every one of 1..n held) and `above:ORIGIN` (numbers above n held),
# under the name in `numberings` (set from catch-up pages). Catch-up asks for the rest.
# A site that finds its numbering renamed (its Redis restarted) also asks the others
# once to send back its own changes they hold (`want-back`): those it lost.
_SITE_KEYS = (  # what every script may touch besides its document or the log
    "hlc",
    "outbox",
    "seen",
    "own",
    "own-count",
    "numbering",
    "got",
    "numberings",
    "above",
    "want-back",
)
DOC_KEYS = (
    "doc",
    "hist",
    "known",
    "heads",
    "gone",
    "vers",
    "old",
    "tomb",
    "dconf",
    "docs",
    "conflicts",
    *_SITE_KEYS,
)
LOG_KEYS = ("log", "entries", *_SITE_KEYS)


def _preamble(names: tuple[str, ...]) -> str:
    lua_names = ", ".join(name.replace("-", "_") for name in names)
    indexes = ", ".join(f"KEYS[{i}]" for i in range(1, len(names) + 1))
    return f"local {lua_names} = {indexes}\n"


DOC_PREAMBLE = _preamble(DOC_KEYS)
LOG_PREAMBLE = _preamble(LOG_KEYS)

SEQ_FUNCTIONS = """
local function fmt(n) return string.format('%.0f', n) end

-- The numbering's name: the run id of this Redis process (see above).
local function numbering_name()
  local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or 'unnamed'
  local stored = redis.call('GET', numbering)
  if stored ~= run then
    redis.call('SET', numbering, run)
    -- Restarted: it may have lost its last changes, which the other sites hold.
    if stored then redis.call('SET', want_back, '1') end
  end
  return run
end

local function own_seq(member)
  local seq = redis.call('INCR', own_count)
  redis.call('ZADD', own, seq, member)
  return seq
end

-- Record that `seq` of `origin`'s numbering `name` is held ('': none), and move `got`
-- over what follows. Numbers of a numbering other than the one this site holds are
-- not recorded (catch-up sends those changes again: harmless).
local function record_seq(origin, seq, name)
  if name ~= redis.call('HGET', numberings, origin) then return end
  local w = tonumber(redis.call('HGET', got, origin) or '0')
  if seq ~= '' and tonumber(seq) > w then redis.call('ZADD', above, seq, seq) end
  while redis.call('ZSCORE', above, fmt(w + 1)) do
    redis.call('ZREM', above, fmt(w + 1))
    w = w + 1
  end
  redis.call('HSET', got, origin, fmt(w))
end
"""

DOC_FUNCTIONS = (
    SEQ_FUNCTIONS
    + """
local function split_id(id)
  local sep = string.find(id, '|', 1, true)
  return tonumber(string.sub(id, 1, sep - 1)), string.sub(id, sep + 1)
end

-- The hlc of an id as Redis reads a score: the digits themselves (a Lua number
-- passed to Redis is written with 14 digits).
local function score_of(id)
  return string.sub(id, 1, string.find(id, '|', 1, true) - 1)
end

local function current_id()
  local h = redis.call('HGET', doc, 'hlc')
  if not h then return nil end
  return h .. '|' .. redis.call('HGET', doc, 'site')
end

local function take_over(name)
  -- (`vers` is never empty once made: the retention keeps its heads and `keep` more)
  if redis.call('EXISTS', vers) == 1 or redis.call('EXISTS', doc) == 0 then return end
  local c = redis.call('HGETALL', doc)
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  local id = f['hlc'] .. '|' .. f['site']
  redis.call('SADD', heads, id)
  redis.call('HSET', vers, id, cjson.encode({content = f['content'], hlc = f['hlc'],
    site = f['site'], base = f['base'] or '', sha256 = f['sha256'] or '',
    written_at = f['written_at']}))
  local records = redis.call('HGETALL', conflicts)
  for i = 1, #records, 2 do
    if string.sub(records[i], 1, #name + 1) == name .. '|' then
      local r = cjson.decode(records[i + 1])
      local rid = r['hlc'] .. '|' .. r['site']
      redis.call('SADD', heads, rid)
      redis.call('HSET', vers, rid, cjson.encode({content = r['content'], hlc = r['hlc'],
        site = r['site'], base = '', sha256 = '', written_at = r['written_at']}))
      redis.call('SADD', dconf, records[i])
    end
  end
end

local function supersede(id)
  redis.call('SADD', gone, id)
  redis.call('SREM', heads, id)
  if redis.call('HEXISTS', vers, id) == 1 then redis.call('ZADD', old, score_of(id), id) end
end

local function supersede_bases(base)
  for b in string.gmatch(base, '[^,]+') do supersede(b) end
end

-- False when the version was known already. Its bases are taken in either way (that
-- is idempotent): a version known from before this layout still supersedes them.
local function add_version(id, version_json, base)
  supersede_bases(base)
  if redis.call('SADD', known, id) == 0 then return false end
  redis.call('HSET', vers, id, version_json)
  if redis.call('SISMEMBER', gone, id) == 1 then supersede(id)
  else redis.call('SADD', heads, id) end
  return true
end

-- Make the greatest head current (a new local version number when it changes) and
-- the other heads the document's conflict records. True when the current one changed.
local function settle(name)
  local ids = redis.call('SMEMBERS', heads)
  local best, best_h, best_s = nil, -1, ''
  for _, id in ipairs(ids) do
    local h, s = split_id(id)
    if h > best_h or (h == best_h and s > best_s) then best, best_h, best_s = id, h, s end
  end
  if not best then return false end
  local changed = false
  if best ~= current_id() then
    local f = cjson.decode(redis.call('HGET', vers, best))
    local v = tostring(tonumber(redis.call('HGET', doc, 'version') or '0') + 1)
    redis.call('HSET', doc, 'version', v, 'content', f['content'], 'hlc', f['hlc'],
               'site', f['site'], 'base', f['base'], 'sha256', f['sha256'],
               'written_at', f['written_at'])
    redis.call('XADD', hist, 'MAXLEN', '~', '1000', '*', 'version', v, 'id', best)
    changed = true
  end
  local wanted = {}
  for _, id in ipairs(ids) do
    if id ~= best then
      local key = name .. '|' .. id
      wanted[key] = true
      local f = cjson.decode(redis.call('HGET', vers, id))
      redis.call('HSET', conflicts, key, cjson.encode({doc = name, content = f['content'],
        hlc = f['hlc'], site = f['site'], written_at = f['written_at'], winner = best}))
      redis.call('SADD', dconf, key)
    end
  end
  for _, key in ipairs(redis.call('SMEMBERS', dconf)) do
    if not wanted[key] then
      redis.call('HDEL', conflicts, key)
      redis.call('SREM', dconf, key)
    end
  end
  return changed
end

-- Drop the oldest superseded versions beyond `keep` (see above); this site's own
-- keep their base in `tomb`, and their number in `own`.
local function trim(site, keep)
  local extra = redis.call('ZCARD', old) - keep
  if extra <= 0 then return end
  for _, id in ipairs(redis.call('ZRANGE', old, 0, extra - 1)) do
    local raw = redis.call('HGET', vers, id)
    if raw and string.sub(id, -#site - 1) == '|' .. site then
      redis.call('HSET', tomb, id, cjson.decode(raw)['base'])
    end
    redis.call('HDEL', vers, id)
  end
  redis.call('ZREMRANGEBYRANK', old, 0, extra - 1)
end

-- The end of applying a change from another site: settled, trimmed, and its number
-- recorded (last: a script does not roll back). True when the current one changed.
local function finish(name, this_site, keep, origin, seq, numbering_of_seq)
  local changed = settle(name)
  trim(this_site, tonumber(keep))
  record_seq(origin, seq, numbering_of_seq)
  return changed
end

-- A change from another site that moved the clock: past it, and past now.
local function observe(remote_hlc, site, now_ms)
  local last = tonumber(redis.call('GET', hlc) or '0')
  local remote = tonumber(remote_hlc)
  redis.call('SET', hlc, fmt(math.max(tonumber(now_ms) * 1000, last + 1, remote + 1)))
  if remote > tonumber(redis.call('HGET', seen, site) or '0') then
    redis.call('HSET', seen, site, remote_hlc)
  end
end
"""
)

# ARGV: expected (this site's version number, or a version id 'hlc|site': the same
#       on every site), content, site, now_ms, sha256, written_at, doc_name,
#       also_replaces ('hlc|site' of other versions this one replaces: a resolution),
#       keep (superseded versions kept)
# The new version replaces the current one; its hlc is above every version this site
# knows, so it is the greatest head and becomes current.
# Returns {1, version, hlc}, or {0, current version, current id} when stale.
WRITE_DOC = (
    DOC_PREAMBLE
    + DOC_FUNCTIONS
    + """
local name = numbering_name()  -- (before any write: INFO is the one call that may be refused)
take_over(ARGV[7])
local cur = tonumber(redis.call('HGET', doc, 'version') or '0')
local cur_id = current_id() or ''
local fresh
if string.find(ARGV[1], '|', 1, true) then fresh = (ARGV[1] == cur_id)
else fresh = (cur == tonumber(ARGV[1])) end
for other in string.gmatch(ARGV[8], '[^,]+') do  -- what a resolution settles: still open?
  if redis.call('SISMEMBER', heads, other) == 0 then fresh = false end
end
if not fresh then return {0, tostring(cur), cur_id} end
local last = tonumber(redis.call('GET', hlc) or '0')
local h = fmt(math.max(tonumber(ARGV[4]) * 1000, last + 1))
redis.call('SET', hlc, h)
local base = cur_id
if ARGV[8] ~= '' then base = (base == '' and ARGV[8]) or (base .. ',' .. ARGV[8]) end
local id = h .. '|' .. ARGV[3]
add_version(id, cjson.encode({content = ARGV[2], hlc = h, site = ARGV[3], base = base,
  sha256 = ARGV[5], written_at = ARGV[6]}), base)
settle(ARGV[7])
trim(ARGV[3], tonumber(ARGV[9]))
redis.call('SADD', docs, ARGV[7])
local seq = own_seq('doc|' .. ARGV[7] .. '|' .. id)
redis.call('XADD', outbox, 'MAXLEN', '~', '100000', '*', 'kind', 'doc', 'doc', ARGV[7],
           'content', ARGV[2], 'hlc', h, 'site', ARGV[3], 'base', base, 'sha256', ARGV[5],
           'written_at', ARGV[6], 'seq', seq, 'numbering', name)
return {1, redis.call('HGET', doc, 'version'), h}
"""
)

# ARGV: doc_name, content, hlc, site, base, sha256, written_at, now_ms, origin,
#       seq ('' when none), numbering, keep, this site
# Returns {1 when the current version changed else 0}, or {-1} for a version already known.
APPLY_DOC = (
    DOC_PREAMBLE
    + DOC_FUNCTIONS
    + """
take_over(ARGV[1])
local id = ARGV[3] .. '|' .. ARGV[4]
local version = cjson.encode({content = ARGV[2], hlc = ARGV[3], site = ARGV[4],
  base = ARGV[5], sha256 = ARGV[6], written_at = ARGV[7]})
local result = -1
if add_version(id, version, ARGV[5]) then
  observe(ARGV[3], ARGV[4], ARGV[8])
  redis.call('SADD', docs, ARGV[1])
  result = 0
end
if finish(ARGV[1], ARGV[13], ARGV[12], ARGV[9], ARGV[10], ARGV[11]) then result = 1 end
return {result}
"""
)

# A version of another site's that its retention dropped, as catch-up tells of it:
# known, superseded (it was, to be dropped), and its bases superseded.
# ARGV: doc_name, hlc, site, base, now_ms, origin, seq, numbering, keep, this site
# Returns {1 when the current version changed else 0}.
APPLY_DROPPED = (
    DOC_PREAMBLE
    + DOC_FUNCTIONS
    + """
take_over(ARGV[1])
local id = ARGV[2] .. '|' .. ARGV[3]
supersede_bases(ARGV[4])
supersede(id)
if redis.call('SADD', known, id) == 1 then observe(ARGV[2], ARGV[3], ARGV[5]) end
if finish(ARGV[1], ARGV[10], ARGV[9], ARGV[6], ARGV[7], ARGV[8]) then return {1} end
return {0}
"""
)

# ARGV: entry_id, text, site, now_ms, written_at
APPEND_LOG = (
    LOG_PREAMBLE
    + SEQ_FUNCTIONS
    + """
local name = numbering_name()  -- (before any write)
local last = tonumber(redis.call('GET', hlc) or '0')
local now = math.max(tonumber(ARGV[4]) * 1000, last + 1)
local h = fmt(now)
redis.call('SET', hlc, h)
redis.call('ZADD', log, 0, string.format('%019.0f', now) .. '|' .. ARGV[3] .. '|' .. ARGV[1])
redis.call('HSET', entries, ARGV[1], cjson.encode({text = ARGV[2], hlc = h, site = ARGV[3],
                                                   written_at = ARGV[5]}))
local seq = own_seq('log|' .. ARGV[1])
redis.call('XADD', outbox, 'MAXLEN', '~', '100000', '*', 'kind', 'log', 'entry_id', ARGV[1],
           'text', ARGV[2], 'hlc', h, 'site', ARGV[3], 'written_at', ARGV[5], 'seq', seq,
           'numbering', name)
return h
"""
)

# ARGV: entry_id, text, hlc, site, written_at, now_ms, origin, seq ('' when none),
#       numbering, keep, this site (the last six as every apply script takes them)
APPLY_LOG = (
    LOG_PREAMBLE
    + SEQ_FUNCTIONS
    + """
local result = 0
if redis.call('HEXISTS', entries, ARGV[1]) == 0 then
  local remote = tonumber(ARGV[3])
  local last = tonumber(redis.call('GET', hlc) or '0')
  redis.call('SET', hlc, fmt(math.max(tonumber(ARGV[6]) * 1000, last + 1, remote + 1)))
  if remote > tonumber(redis.call('HGET', seen, ARGV[4]) or '0') then
    redis.call('HSET', seen, ARGV[4], ARGV[3])
  end
  redis.call('ZADD', log, 0, string.format('%019.0f', remote) .. '|' .. ARGV[4] .. '|' .. ARGV[1])
  redis.call('HSET', entries, ARGV[1], cjson.encode({text = ARGV[2], hlc = ARGV[3],
                                                     site = ARGV[4], written_at = ARGV[5]}))
  result = 1
end
record_seq(ARGV[7], ARGV[8], ARGV[9])
return result
"""
)

# What this site holds of the other sites' numbers, read at one instant: `got`,
# `numberings`, and the first `count` numbers of each `above:ORIGIN` (ARGV[1]: the
# prefix of those keys, which depend on the origins found).
# ARGV: above prefix, count
HOLDINGS = (
    LOG_PREAMBLE
    + SEQ_FUNCTIONS
    + """
numbering_name()  -- (notices a restart)
local held = redis.call('HGETALL', got)
local early = {}
for i = 1, #held, 2 do
  early[#early + 1] = held[i]
  early[#early + 1] = redis.call('ZRANGE', ARGV[1] .. held[i], 0, tonumber(ARGV[2]) - 1)
end
return {held, redis.call('HGETALL', numberings), early, redis.call('HGETALL', seen),
        redis.call('GET', want_back) or ''}
"""
)

# A catch-up page from `origin` begins: it names the numbering its numbers count. A
# different one than this site holds: what it held of the old one is forgotten (the
# page answers from the start).
# ARGV: origin, numbering
ADOPT_NUMBERING = (
    LOG_PREAMBLE
    + """
if redis.call('HGET', numberings, ARGV[1]) == ARGV[2] then return 0 end
redis.call('HSET', numberings, ARGV[1], ARGV[2])
redis.call('HDEL', got, ARGV[1])
redis.call('DEL', above)
return 1
"""
)

# A catch-up page applied: this site now holds every change 1..through of the origin
# (under the numbering the page named, adopted first).
# ARGV: origin, through, numbering
ADVANCE = (
    LOG_PREAMBLE
    + SEQ_FUNCTIONS
    + """
if redis.call('HGET', numberings, ARGV[1]) ~= ARGV[3] then return 0 end
local w = tonumber(redis.call('HGET', got, ARGV[1]) or '0')
if tonumber(ARGV[2]) > w then
  redis.call('ZREMRANGEBYSCORE', above, '-inf', ARGV[2])
  redis.call('HSET', got, ARGV[1], ARGV[2])
end
record_seq(ARGV[1], '', ARGV[3])
return 1
"""
)

# One page of this site's own changes above `after`, read at one instant: the
# numbering's name, the counter (every number up to it is in `own`) and the refs with
# their numbers.
# ARGV: after, count
OWN_PAGE = (
    LOG_PREAMBLE
    + SEQ_FUNCTIONS
    + """
local refs = redis.call('ZRANGEBYSCORE', own, '(' .. ARGV[1], '+inf', 'WITHSCORES',
                        'LIMIT', 0, tonumber(ARGV[2]))
return {numbering_name(), redis.call('GET', own_count) or '0', refs}
"""
)

# Upgrade of one document from an earlier layout (idempotent): taken over (as a write
# would), versions this site's record still holds in full (before versions were kept
# by id) kept as superseded history, superseded versions indexed (`old`), and this
# site's own versions numbered, oldest first.
# ARGV: doc_name, this site, keep
UPGRADE_DOC = (
    DOC_PREAMBLE
    + DOC_FUNCTIONS
    + """
take_over(ARGV[1])
for _, entry in ipairs(redis.call('XRANGE', hist, '-', '+')) do
  local f = {}
  for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
  if f['content'] then
    local id = f['hlc'] .. '|' .. f['site']
    if redis.call('HEXISTS', vers, id) == 0 and redis.call('SISMEMBER', heads, id) == 0 then
      redis.call('SADD', known, id)
      redis.call('HSET', vers, id, cjson.encode({content = f['content'], hlc = f['hlc'],
        site = f['site'], base = f['base'] or '', sha256 = f['sha256'] or '',
        written_at = f['written_at']}))
      supersede(id)
    end
  end
end
local mine = {}
for _, id in ipairs(redis.call('HKEYS', vers)) do
  if redis.call('SISMEMBER', heads, id) == 0 then redis.call('ZADD', old, score_of(id), id) end
  local h, s = split_id(id)
  if s == ARGV[2] and not redis.call('ZSCORE', own, 'doc|' .. ARGV[1] .. '|' .. id) then
    mine[#mine + 1] = {h, id}
  end
end
table.sort(mine, function(a, b) return a[1] < b[1] end)
for _, m in ipairs(mine) do own_seq('doc|' .. ARGV[1] .. '|' .. m[2]) end
trim(ARGV[2], tonumber(ARGV[3]))
return #mine
"""
)

# Upgrade of the log: this site's own entries numbered, oldest first (idempotent).
# ARGV: this site
UPGRADE_LOG = (
    LOG_PREAMBLE
    + SEQ_FUNCTIONS
    + """
local numbered = 0
for _, member in ipairs(redis.call('ZRANGE', log, 0, -1)) do
  local first = string.find(member, '|', 1, true)
  local second = string.find(member, '|', first + 1, true)
  if string.sub(member, first + 1, second - 1) == ARGV[1] then
    local ref = 'log|' .. string.sub(member, second + 1)
    if not redis.call('ZSCORE', own, ref) then
      own_seq(ref)
      numbered = numbered + 1
    end
  end
end
return numbered
"""
)
