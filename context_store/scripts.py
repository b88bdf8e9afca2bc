"""Lua scripts: every context-store write is one atomic script in Redis.

The hybrid logical clock lives in Redis (`hlc` key) so every writer of a site
shares it: hlc = max(now_ms * 1000, last + 1) for a local event, and also
above the remote timestamp for a received one. Timestamps stay under 2^53 (Lua
numbers are doubles) and are formatted with %.0f, never tostring.
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
# Per document: heads (set of ids), gone (set), vers (hash id -> the version as JSON),
# dconf (set of its conflict record keys), hist (this site's record of its current
# version's changes: local number and id). A store from before this layout is taken
# over the first time a document is touched: its current version and its conflict
# records become heads.
#
# History is `vers`, trimmed: beyond `keep` superseded versions, the oldest by
# (hlc, site) are dropped (never a head: the current version and every conflict
# record stay). Superseded is forever and the rule looks only at the set of versions,
# so sites that hold the same versions keep the same ones. Ids stay in `known` and
# `gone`, so a dropped version that arrives again is not taken back.
#
# Sequence numbers: each of a site's own changes (a version it wrote, a log entry)
# gets the next number of its `own-seq` counter, indexed in `own` (member 'doc|NAME|ID'
# or 'log|ENTRY_ID', score seq) and carried in its event. A site that applies another's
# changes records which numbers it holds: `got` (origin -> n, every one of 1..n held)
# and `above:ORIGIN` (numbers above n held). Catch-up asks for exactly the others.
SEQ_FUNCTIONS = """
local function fmt(n) return string.format('%.0f', n) end

local function own_seq(counter, own, member)
  local seq = redis.call('INCR', counter)
  redis.call('ZADD', own, seq, member)
  return seq
end

-- Record that `seq` of `origin` is held ('': none), and move `got` over what follows.
local function record_seq(got, above, origin, seq)
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

local function current_id(doc)
  local h = redis.call('HGET', doc, 'hlc')
  if not h then return nil end
  return h .. '|' .. redis.call('HGET', doc, 'site')
end

local function take_over(doc, heads, vers, conflicts, dconf, name)
  if redis.call('EXISTS', heads) == 1 or redis.call('EXISTS', doc) == 0 then return end
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

-- False when the version was known already. Its bases are taken in either way (that
-- is idempotent): a version known from before this layout still supersedes them.
local function add_version(known, heads, gone, vers, id, version_json, base)
  for b in string.gmatch(base, '[^,]+') do
    redis.call('SADD', gone, b)
    redis.call('SREM', heads, b)
  end
  if redis.call('SADD', known, id) == 0 then return false end
  redis.call('HSET', vers, id, version_json)
  if redis.call('SISMEMBER', gone, id) == 0 then redis.call('SADD', heads, id) end
  return true
end

-- Make the greatest head current (a new local version number when it changes) and
-- the other heads the document's conflict records. True when the current one changed.
local function settle(doc, hist, heads, vers, conflicts, dconf, name)
  local ids = redis.call('SMEMBERS', heads)
  local best, best_h, best_s = nil, -1, ''
  for _, id in ipairs(ids) do
    local h, s = split_id(id)
    if h > best_h or (h == best_h and s > best_s) then best, best_h, best_s = id, h, s end
  end
  if not best then return false end
  local changed = false
  if best ~= current_id(doc) then
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

-- Drop the oldest superseded versions beyond `keep` (see above).
local function trim(heads, vers, own, name, site, keep)
  if redis.call('HLEN', vers) - redis.call('SCARD', heads) <= keep then return end
  local old = {}
  for _, id in ipairs(redis.call('HKEYS', vers)) do
    if redis.call('SISMEMBER', heads, id) == 0 then
      local h, s = split_id(id)
      old[#old + 1] = {h, s, id}
    end
  end
  table.sort(old, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end)
  for i = 1, #old - keep do
    redis.call('HDEL', vers, old[i][3])
    if old[i][2] == site then redis.call('ZREM', own, 'doc|' .. name .. '|' .. old[i][3]) end
  end
end
"""
)

# KEYS: doc, hist, known, hlc, outbox, docs, heads, gone, vers, conflicts, dconf,
#       own-seq, own
# ARGV: expected (this site's version number, or a version id 'hlc|site': the same
#       on every site), content, site, now_ms, sha256, written_at, doc_name,
#       also_replaces ('hlc|site' of other versions this one replaces: a resolution),
#       keep (superseded versions kept)
# The new version replaces the current one; its hlc is above every version this site
# knows, so it is the greatest head and becomes current.
# Returns {1, version, hlc}, or {0, current version, current id} when stale.
WRITE_DOC = (
    DOC_FUNCTIONS
    + """
take_over(KEYS[1], KEYS[7], KEYS[9], KEYS[10], KEYS[11], ARGV[7])
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local cur_id = current_id(KEYS[1]) or ''
local fresh
if string.find(ARGV[1], '|', 1, true) then fresh = (ARGV[1] == cur_id)
else fresh = (cur == tonumber(ARGV[1])) end
for other in string.gmatch(ARGV[8], '[^,]+') do  -- what a resolution settles: still open?
  if redis.call('SISMEMBER', KEYS[7], other) == 0 then fresh = false end
end
if not fresh then return {0, tostring(cur), cur_id} end
local last = tonumber(redis.call('GET', KEYS[4]) or '0')
local h = fmt(math.max(tonumber(ARGV[4]) * 1000, last + 1))
redis.call('SET', KEYS[4], h)
local base = cur_id
if ARGV[8] ~= '' then base = (base == '' and ARGV[8]) or (base .. ',' .. ARGV[8]) end
local id = h .. '|' .. ARGV[3]
add_version(KEYS[3], KEYS[7], KEYS[8], KEYS[9], id, cjson.encode({content = ARGV[2],
  hlc = h, site = ARGV[3], base = base, sha256 = ARGV[5], written_at = ARGV[6]}), base)
settle(KEYS[1], KEYS[2], KEYS[7], KEYS[9], KEYS[10], KEYS[11], ARGV[7])
local seq = own_seq(KEYS[12], KEYS[13], 'doc|' .. ARGV[7] .. '|' .. id)
trim(KEYS[7], KEYS[9], KEYS[13], ARGV[7], ARGV[3], tonumber(ARGV[9]))
redis.call('SADD', KEYS[6], ARGV[7])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', '100000', '*', 'kind', 'doc', 'doc', ARGV[7],
           'content', ARGV[2], 'hlc', h, 'site', ARGV[3], 'base', base, 'sha256', ARGV[5],
           'written_at', ARGV[6], 'seq', seq)
return {1, redis.call('HGET', KEYS[1], 'version'), h}
"""
)

# KEYS: doc, hist, known, hlc, conflicts, docs, seen, heads, gone, vers, dconf, own,
#       got, above:ORIGIN
# ARGV: doc_name, content, hlc, site, base, sha256, written_at, now_ms, origin,
#       seq ('' when none), keep, this site
# Returns {1 when the current version changed else 0}, or {-1} for a version already known.
APPLY_DOC = (
    DOC_FUNCTIONS
    + """
record_seq(KEYS[13], KEYS[14], ARGV[9], ARGV[10])
take_over(KEYS[1], KEYS[8], KEYS[10], KEYS[5], KEYS[11], ARGV[1])
local id = ARGV[3] .. '|' .. ARGV[4]
local version = cjson.encode({content = ARGV[2], hlc = ARGV[3], site = ARGV[4],
  base = ARGV[5], sha256 = ARGV[6], written_at = ARGV[7]})
local keep = tonumber(ARGV[11])
if not add_version(KEYS[3], KEYS[8], KEYS[9], KEYS[10], id, version, ARGV[5]) then
  settle(KEYS[1], KEYS[2], KEYS[8], KEYS[10], KEYS[5], KEYS[11], ARGV[1])
  trim(KEYS[8], KEYS[10], KEYS[12], ARGV[1], ARGV[12], keep)
  return {-1}
end
local last = tonumber(redis.call('GET', KEYS[4]) or '0')
local remote = tonumber(ARGV[3])
redis.call('SET', KEYS[4], fmt(math.max(tonumber(ARGV[8]) * 1000, last + 1, remote + 1)))
if remote > tonumber(redis.call('HGET', KEYS[7], ARGV[4]) or '0') then
  redis.call('HSET', KEYS[7], ARGV[4], ARGV[3])
end
redis.call('SADD', KEYS[6], ARGV[1])
local changed = settle(KEYS[1], KEYS[2], KEYS[8], KEYS[10], KEYS[5], KEYS[11], ARGV[1])
trim(KEYS[8], KEYS[10], KEYS[12], ARGV[1], ARGV[12], keep)
if changed then return {1} end
return {0}
"""
)

# KEYS: log, entries, hlc, outbox, own-seq, own
# ARGV: entry_id, text, site, now_ms, written_at
APPEND_LOG = (
    SEQ_FUNCTIONS
    + """
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
local hlc = math.max(tonumber(ARGV[4]) * 1000, last + 1)
local h = fmt(hlc)
redis.call('SET', KEYS[3], h)
redis.call('ZADD', KEYS[1], 0, string.format('%019.0f', hlc) .. '|' .. ARGV[3] .. '|' .. ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({text = ARGV[2], hlc = h, site = ARGV[3],
                                                   written_at = ARGV[5]}))
local seq = own_seq(KEYS[5], KEYS[6], 'log|' .. ARGV[1])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100000', '*', 'kind', 'log', 'entry_id', ARGV[1],
           'text', ARGV[2], 'hlc', h, 'site', ARGV[3], 'written_at', ARGV[5], 'seq', seq)
return h
"""
)

# KEYS: log, entries, hlc, seen, got, above:ORIGIN
# ARGV: entry_id, text, hlc, site, written_at, now_ms, origin, seq ('' when none)
APPLY_LOG = (
    SEQ_FUNCTIONS
    + """
record_seq(KEYS[5], KEYS[6], ARGV[7], ARGV[8])
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local remote = tonumber(ARGV[3])
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
redis.call('SET', KEYS[3], fmt(math.max(tonumber(ARGV[6]) * 1000, last + 1, remote + 1)))
if remote > tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '0') then
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[3])
end
redis.call('ZADD', KEYS[1], 0, string.format('%019.0f', remote) .. '|' .. ARGV[4] .. '|' .. ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({text = ARGV[2], hlc = ARGV[3], site = ARGV[4],
                                                   written_at = ARGV[5]}))
return 1
"""
)

# A catch-up page applied: the asker now holds every change 1..through of the origin.
# KEYS: got, above:ORIGIN   ARGV: origin, through
ADVANCE = (
    SEQ_FUNCTIONS
    + """
local w = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local through = tonumber(ARGV[2])
if through > w then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
record_seq(KEYS[1], KEYS[2], ARGV[1], '')
return redis.call('HGET', KEYS[1], ARGV[1])
"""
)

# A catch-up page names the origin's numbering. The first one named is taken as it
# is; a different one means the origin lost its data and numbers from 1 again (the
# page then holds all it has): what this site held of the old numbering is forgotten.
# KEYS: numberings, got, above:ORIGIN   ARGV: origin, numbering
ADOPT_NUMBERING = """
local known = redis.call('HGET', KEYS[1], ARGV[1])
if known == ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if not known then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""

# One page of this site's own changes above `after`, read at one instant: the refs
# with their numbers, and the counter (every number up to it is in `own`, or was
# dropped by the history retention).
# KEYS: own, own-seq   ARGV: after, count
OWN_PAGE = """
local refs = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES',
                        'LIMIT', 0, tonumber(ARGV[2]))
return {redis.call('GET', KEYS[2]) or '0', refs}
"""

# Upgrade of one document from an earlier layout (idempotent): taken over (as a write
# would), versions this site's record still holds in full (before versions were kept
# by id) kept as superseded history, and this site's own versions numbered.
# KEYS: doc, hist, known, heads, gone, vers, conflicts, dconf, own-seq, own
# ARGV: doc_name, this site, keep
UPGRADE_DOC = (
    DOC_FUNCTIONS
    + """
take_over(KEYS[1], KEYS[4], KEYS[6], KEYS[7], KEYS[8], ARGV[1])
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
  local f = {}
  for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
  if f['content'] then
    local id = f['hlc'] .. '|' .. f['site']
    if redis.call('SADD', KEYS[3], id) == 1 or redis.call('HEXISTS', KEYS[6], id) == 0 then
      if redis.call('SISMEMBER', KEYS[4], id) == 0 then
        redis.call('SADD', KEYS[5], id)
        redis.call('HSET', KEYS[6], id, cjson.encode({content = f['content'], hlc = f['hlc'],
          site = f['site'], base = f['base'] or '', sha256 = f['sha256'] or '',
          written_at = f['written_at']}))
      end
    end
  end
end
local numbered = 0
for _, id in ipairs(redis.call('HKEYS', KEYS[6])) do
  local member = 'doc|' .. ARGV[1] .. '|' .. id
  local mine = string.sub(id, -#ARGV[2] - 1) == '|' .. ARGV[2]
  if mine and not redis.call('ZSCORE', KEYS[10], member) then
    own_seq(KEYS[9], KEYS[10], member)
    numbered = numbered + 1
  end
end
trim(KEYS[4], KEYS[6], KEYS[10], ARGV[1], ARGV[2], tonumber(ARGV[3]))
return numbered
"""
)

# Upgrade of the log: this site's own entries numbered (idempotent).
# KEYS: log, own-seq, own   ARGV: this site
UPGRADE_LOG = (
    SEQ_FUNCTIONS
    + """
local numbered = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local first = string.find(member, '|', 1, true)
  local second = string.find(member, '|', first + 1, true)
  if string.sub(member, first + 1, second - 1) == ARGV[1] then
    local ref = 'log|' .. string.sub(member, second + 1)
    if not redis.call('ZSCORE', KEYS[3], ref) then
      own_seq(KEYS[2], KEYS[3], ref)
      numbered = numbered + 1
    end
  end
end
return numbered
"""
)
