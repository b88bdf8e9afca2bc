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
# dconf (set of its conflict record keys). A store from before this layout is taken
# over the first time a document is touched: its current version and its conflict
# records become heads.
DOC_FUNCTIONS = """
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
    local fields = {'version', v, 'content', f['content'], 'hlc', f['hlc'], 'site', f['site'],
                    'base', f['base'], 'sha256', f['sha256'], 'written_at', f['written_at']}
    redis.call('HSET', doc, unpack(fields))
    redis.call('XADD', hist, '*', unpack(fields))
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
"""

# KEYS: doc, hist, known, hlc, outbox, docs, heads, gone, vers, conflicts, dconf
# ARGV: expected (this site's version number, or a version id 'hlc|site': the same
#       on every site), content, site, now_ms, sha256, written_at, doc_name,
#       also_replaces ('hlc|site' of other versions this one replaces: a resolution)
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
local h = string.format('%.0f', math.max(tonumber(ARGV[4]) * 1000, last + 1))
redis.call('SET', KEYS[4], h)
local base = current_id(KEYS[1]) or ''
if ARGV[8] ~= '' then base = (base == '' and ARGV[8]) or (base .. ',' .. ARGV[8]) end
local id = h .. '|' .. ARGV[3]
add_version(KEYS[3], KEYS[7], KEYS[8], KEYS[9], id, cjson.encode({content = ARGV[2],
  hlc = h, site = ARGV[3], base = base, sha256 = ARGV[5], written_at = ARGV[6]}), base)
settle(KEYS[1], KEYS[2], KEYS[7], KEYS[9], KEYS[10], KEYS[11], ARGV[7])
redis.call('SADD', KEYS[6], ARGV[7])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', '100000', '*', 'kind', 'doc', 'doc', ARGV[7],
           'content', ARGV[2], 'hlc', h, 'site', ARGV[3], 'base', base, 'sha256', ARGV[5],
           'written_at', ARGV[6])
return {1, redis.call('HGET', KEYS[1], 'version'), h}
"""
)

# KEYS: doc, hist, known, hlc, conflicts, docs, seen, heads, gone, vers, dconf
# ARGV: doc_name, content, hlc, site, base, sha256, written_at, now_ms
# Returns {1 when the current version changed else 0}, or {-1} for a version already known.
APPLY_DOC = (
    DOC_FUNCTIONS
    + """
take_over(KEYS[1], KEYS[8], KEYS[10], KEYS[5], KEYS[11], ARGV[1])
local id = ARGV[3] .. '|' .. ARGV[4]
local version = cjson.encode({content = ARGV[2], hlc = ARGV[3], site = ARGV[4],
  base = ARGV[5], sha256 = ARGV[6], written_at = ARGV[7]})
if not add_version(KEYS[3], KEYS[8], KEYS[9], KEYS[10], id, version, ARGV[5]) then
  settle(KEYS[1], KEYS[2], KEYS[8], KEYS[10], KEYS[5], KEYS[11], ARGV[1])
  return {-1}
end
local last = tonumber(redis.call('GET', KEYS[4]) or '0')
local remote = tonumber(ARGV[3])
redis.call('SET', KEYS[4], string.format('%.0f', math.max(tonumber(ARGV[8]) * 1000, last + 1,
                                                          remote + 1)))
if remote > tonumber(redis.call('HGET', KEYS[7], ARGV[4]) or '0') then
  redis.call('HSET', KEYS[7], ARGV[4], ARGV[3])
end
redis.call('SADD', KEYS[6], ARGV[1])
if settle(KEYS[1], KEYS[2], KEYS[8], KEYS[10], KEYS[5], KEYS[11], ARGV[1]) then return {1} end
return {0}
"""
)

# KEYS: log, entries, hlc, outbox
# ARGV: entry_id, text, site, now_ms, written_at
APPEND_LOG = """
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
local hlc = math.max(tonumber(ARGV[4]) * 1000, last + 1)
local h = string.format('%.0f', hlc)
redis.call('SET', KEYS[3], h)
redis.call('ZADD', KEYS[1], 0, string.format('%019.0f', hlc) .. '|' .. ARGV[3] .. '|' .. ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({text = ARGV[2], hlc = h, site = ARGV[3],
                                                   written_at = ARGV[5]}))
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100000', '*', 'kind', 'log', 'entry_id', ARGV[1],
           'text', ARGV[2], 'hlc', h, 'site', ARGV[3], 'written_at', ARGV[5])
return h
"""

# KEYS: log, entries, hlc, seen
# ARGV: entry_id, text, hlc, site, written_at, now_ms
APPLY_LOG = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local remote = tonumber(ARGV[3])
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
redis.call('SET', KEYS[3], string.format('%.0f', math.max(tonumber(ARGV[6]) * 1000, last + 1,
                                                          remote + 1)))
if remote > tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '0') then
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[3])
end
redis.call('ZADD', KEYS[1], 0, string.format('%019.0f', remote) .. '|' .. ARGV[4] .. '|' .. ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({text = ARGV[2], hlc = ARGV[3], site = ARGV[4],
                                                   written_at = ARGV[5]}))
return 1
"""
