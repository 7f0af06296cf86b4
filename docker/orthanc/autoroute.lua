-- Autorouting to MedMO Serve: every image Orthanc stores is sent to the service once per configured
-- task ("report", "ground"), and each answer, a DICOM Structured Report in the image's patient and
-- study, is stored back into Orthanc, where viewers and the RIS find it next to the image. A task
-- written "ground:gsps" asks /ground for a Grayscale Softcopy Presentation State instead, the object
-- PACS viewers draw boxes from.
--
-- Settings come from the "MedMO" section of the Orthanc configuration (see orthanc.json):
--   Url             base URL of the service, e.g. "http://medmo:8000"
--   Tasks           routes to call, e.g. ["report", "ground", "ground:gsps"]
--   ApiKey          sent as "Authorization: Bearer <ApiKey>" when not empty
--   TimeoutSeconds  longest wait for one answer (needs Orthanc's SetHttpTimeout(); on Orthanc
--                   1.10 the global "HttpTimeout" option bounds it instead)
--
-- Orthanc runs this in one Lua thread, after the instance is stored and indexed: a slow or failing
-- service delays or skips the SRs, never the storage of images. Every failure is logged and the
-- image stays as it was. The tasks that succeeded are recorded in the instance's "MedMORouted"
-- metadata (declared in "UserMetadata"): Orthanc calls OnStoredInstance again when a modality sends
-- an instance it already has, and that must not file a second set of SRs. So sending an image again
-- retries exactly the tasks that failed.
-- The log never receives tags or the service's answers: they may hold patient data. Only Orthanc's
-- instance identifiers (hashes) and task names are logged.

local LOG_PREFIX = 'MedMO autoroute: '

-- Read once: Orthanc does not reload its configuration without a restart, and neither do we.
local function LoadSettings()
  local section = GetOrthancConfiguration()['MedMO'] or {}
  local settings = {
    url = section['Url'] or '',
    tasks = section['Tasks'] or { 'report', 'ground' },
    apiKey = section['ApiKey'] or '',
    timeout = tonumber(section['TimeoutSeconds']) or 300,
  }
  -- A trailing slash would make "http://medmo:8000//report".
  settings.url = string.gsub(settings.url, '/+$', '')
  return settings
end

local SETTINGS = LoadSettings()

-- Where the tasks already done for an instance are kept, comma-separated.
local ROUTED = 'MedMORouted'

-- Orthanc runs this file once per Lua context it creates (twice in 1.10), so these warnings repeat.
if SETTINGS.url == '' then
  print(LOG_PREFIX .. 'no "MedMO": {"Url": ...} in the configuration; images will not be routed')
end
if (GetOrthancConfiguration()['UserMetadata'] or {})[ROUTED] == nil then
  print(LOG_PREFIX .. 'no "UserMetadata": {"' .. ROUTED .. '": ...} in the configuration; '
    .. 'an image sent twice gets its SRs twice')
end

-- HttpPost() waits 60 s by default and an inference can take longer, queued behind others.
-- SetHttpTimeout() appeared after Orthanc 1.10; there, the global "HttpTimeout" option applies.
if SetHttpTimeout ~= nil then
  SetHttpTimeout(SETTINGS.timeout)
end

-- Objects that are not images: the service has nothing to look at in them, and SRs are what it
-- writes, so sending those would loop.
local NOT_IMAGES = {
  SR = true, KO = true, PR = true, SEG = true, DOC = true,
  RTSTRUCT = true, RTPLAN = true, RTDOSE = true, RTRECORD = true, REG = true,
}

-- A DICOM Part 10 file: a 128-byte preamble, then "DICM".
local function IsDicomFile(bytes)
  return type(bytes) == 'string' and string.sub(bytes, 129, 132) == 'DICM'
end

-- "ground:gsps": the route, and the DICOM object wanted from it (a Structured Report by default).
local function RouteAndObject(task)
  local route, object = string.match(task, '^([^:]+):?(.*)$')
  return route, object
end

local function RequestHeaders(object)
  local headers = {
    ['Content-Type'] = 'application/dicom',
    -- Without it the service answers JSON; with it, an SR, or the object named.
    ['Accept'] = object ~= '' and ('application/dicom; object=' .. object) or 'application/dicom',
  }
  if SETTINGS.apiKey ~= '' then
    headers['Authorization'] = 'Bearer ' .. SETTINGS.apiKey
  end
  return headers
end

-- Sends one instance to one task and stores the SR it answers. Raises on failure (caught by the
-- caller), with a message free of patient data.
local function Route(instanceId, dicom, task)
  local route, object = RouteAndObject(task)
  local answer = HttpPost(SETTINGS.url .. '/' .. route, dicom, RequestHeaders(object))

  -- Orthanc 1.10 answers nil when there was no answer (connection refused, timeout) and an empty
  -- string on an HTTP error status, the service's JSON error dropped; it logs the cause itself
  -- just above. Other versions may differ, so the answer is only trusted if it is a DICOM file.
  if answer == nil or answer == '' then
    error('no answer (the HTTP error is logged above)', 0)
  end
  if not IsDicomFile(answer) then
    error('the answer is not a DICOM file (' .. string.len(answer) .. ' bytes)', 0)
  end

  -- Stored through the REST API, so its origin is "Lua" and OnStoredInstance skips it.
  local stored = RestApiPost('/instances', answer)
  if stored == nil then
    error('Orthanc refused the answer (see the error above)', 0)
  end
  return ParseJson(stored)['ID']
end

-- The set of tasks already done for an instance, from its metadata.
local function RoutedTasks(instanceId)
  local done = {}
  -- "?expand" lists all metadata with their values, without an error when ours is not there yet.
  local metadata = RestApiGet('/instances/' .. instanceId .. '/metadata?expand')
  local value = metadata and ParseJson(metadata)[ROUTED] or ''
  for task in string.gmatch(value, '[^,]+') do
    done[task] = true
  end
  return done
end

local function MarkRouted(instanceId, done)
  local tasks = {}
  for task in pairs(done) do
    table.insert(tasks, task)
  end
  table.sort(tasks)
  RestApiPut('/instances/' .. instanceId .. '/metadata/' .. ROUTED, table.concat(tasks, ','))
end

local function RouteStoredInstance(instanceId, tags, origin)
  -- Instances this script (or another Lua script) stored: the SRs, or a modified copy of an image,
  -- which was routed when it first arrived.
  if origin ~= nil and origin['RequestOrigin'] == 'Lua' then
    return
  end
  if NOT_IMAGES[tags['Modality'] or ''] then
    return
  end
  if SETTINGS.url == '' then
    return
  end

  local done = RoutedTasks(instanceId)
  local dicom = nil
  for _, task in ipairs(SETTINGS.tasks) do
    if not done[task] then
      -- Read once, and only when a task is left: a re-sent image costs nothing.
      dicom = dicom or RestApiGet('/instances/' .. instanceId .. '/file')
      if dicom == nil then
        error('could not read the instance', 0)
      end
      -- pcall: one failing task must not stop the others.
      local ok, result = pcall(Route, instanceId, dicom, task)
      if ok then
        done[task] = true
        MarkRouted(instanceId, done)
        print(LOG_PREFIX .. task .. ' of instance ' .. instanceId .. ' stored as instance ' .. result)
      else
        print(LOG_PREFIX .. task .. ' of instance ' .. instanceId .. ' failed: ' .. tostring(result))
      end
    end
  end
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  -- Orthanc would log an escaping error itself; catching it keeps the message ours and the
  -- failure confined to this instance.
  local ok, problem = pcall(RouteStoredInstance, instanceId, tags, origin)
  if not ok then
    print(LOG_PREFIX .. 'instance ' .. instanceId .. ' failed: ' .. tostring(problem))
  end
end
