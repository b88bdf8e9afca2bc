"""Lua scripts: every context-store write is one atomic script in Redis.

The hybrid logical clock lives in Redis (`hlc` key) so every writer of a site
shares it: hlc = max(now_ms * 1000, last + 1) for a local event, and also
above the remote timestamp for a received one. Timestamps stay under 2^53 (Lua
numbers are doubles) and are formatted with %.0f, never tostring.
"""

# KEYS: doc, hist, known, hlc, outbox, docs
# ARGV: expected_version, content, site, now_ms, sha256, written_at, doc_name
WRITE_DOC = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if cur ~= tonumber(ARGV[1]) then return {0, tostring(cur), ''} end
local last = tonumber(redis.call('GET', KEYS[4]) or '0')
local h = string.format('%.0f', math.max(tonumber(ARGV[4]) * 1000, last + 1))
redis.call('SET', KEYS[4], h)
local base = ''
local base_hlc = redis.call('HGET', KEYS[1], 'hlc')
if base_hlc then base = base_hlc .. '|' .. redis.call('HGET', KEYS[1], 'site') end
local v = tostring(cur + 1)
local fields = {'version', v, 'content', ARGV[2], 'hlc', h, 'site', ARGV[3], 'base', base,
                'sha256', ARGV[5], 'written_at', ARGV[6]}
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('SADD', KEYS[3], h .. '|' .. ARGV[3])
redis.call('SADD', KEYS[6], ARGV[7])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', '100000', '*', 'kind', 'doc', 'doc', ARGV[7],
           'content', ARGV[2], 'hlc', h, 'site', ARGV[3], 'base', base, 'sha256', ARGV[5],
           'written_at', ARGV[6])
return {1, v, h}
"""

# KEYS: doc, hist, known, hlc, conflicts, docs, seen
# ARGV: doc_name, content, hlc, site, base, sha256, written_at, now_ms
# Returns {applied (0/1), loser ('current', 'remote' or '')}, or {-1, ''} for a duplicate.
APPLY_DOC = """
local id = ARGV[3] .. '|' .. ARGV[4]
if redis.call('SADD', KEYS[3], id) == 0 then return {-1, ''} end
local last = tonumber(redis.call('GET', KEYS[4]) or '0')
local remote = tonumber(ARGV[3])
redis.call('SET', KEYS[4], string.format('%.0f', math.max(tonumber(ARGV[8]) * 1000, last + 1,
                                                          remote + 1)))
if remote > tonumber(redis.call('HGET', KEYS[7], ARGV[4]) or '0') then
  redis.call('HSET', KEYS[7], ARGV[4], ARGV[3])
end
redis.call('SADD', KEYS[6], ARGV[1])
local cur_hlc = redis.call('HGET', KEYS[1], 'hlc')
local apply, loser = false, ''
if not cur_hlc then
  apply = true
else
  local cur_site = redis.call('HGET', KEYS[1], 'site')
  if ARGV[5] == cur_hlc .. '|' .. cur_site then
    apply = true
  else
    local current = tonumber(cur_hlc)
    if remote > current or (remote == current and ARGV[4] > cur_site) then
      apply, loser = true, 'current'
    else
      loser = 'remote'
    end
  end
end
if loser == 'current' then
  local c = redis.call('HGETALL', KEYS[1])
  local cur = {}
  for i = 1, #c, 2 do cur[c[i]] = c[i + 1] end
  local key = ARGV[1] .. '|' .. cur['hlc'] .. '|' .. cur['site']
  redis.call('HSET', KEYS[5], key, cjson.encode({doc = ARGV[1], content = cur['content'],
    hlc = cur['hlc'], site = cur['site'], written_at = cur['written_at'], winner = id}))
elseif loser == 'remote' then
  local key = ARGV[1] .. '|' .. id
  redis.call('HSET', KEYS[5], key, cjson.encode({doc = ARGV[1], content = ARGV[2],
    hlc = ARGV[3], site = ARGV[4], written_at = ARGV[7],
    winner = cur_hlc .. '|' .. redis.call('HGET', KEYS[1], 'site')}))
end
if apply then
  local v = tostring(tonumber(redis.call('HGET', KEYS[1], 'version') or '0') + 1)
  local fields = {'version', v, 'content', ARGV[2], 'hlc', ARGV[3], 'site', ARGV[4],
                  'base', ARGV[5], 'sha256', ARGV[6], 'written_at', ARGV[7]}
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('XADD', KEYS[2], '*', unpack(fields))
  return {1, loser}
end
return {0, loser}
"""

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
