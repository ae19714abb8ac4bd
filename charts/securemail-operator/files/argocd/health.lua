-- Argo CD health of a securemail.io/SecureMailTenant, from the conditions the operator writes. Ready sums up
-- ConfigValid, DkimReady, MtaAvailable, IpPoolConflict and DomainConflict, and QueueStorageEncrypted when the spec
-- requires encryption at rest; its reason is that of the first one that is bad.
-- Argo CD runs it in gopher-lua (Lua 5.1) with only the base, table and os libraries: no string or math functions.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c)
  local why = c.reason or c.type
  if c.message ~= nil and c.message ~= "" then
    return why .. ": " .. c.message
  end
  return why
end

local function report(status, message)
  hs.status = status
  hs.message = message
  return hs
end

-- The Drain deletion policy keeps the finalizer until every queue is empty, which can take a while.
if obj.metadata.deletionTimestamp ~= nil then
  local draining = condition("Draining")
  if draining ~= nil and draining.status == "True" then
    return report("Progressing", "deleting: " .. describe(draining))
  end
  return report("Progressing", "deleting")
end

-- Checked before observedGeneration: pausing changes the spec, and a paused tenant is not reconciled again.
if obj.spec ~= nil and obj.spec.paused == true then
  local paused = condition("Paused")
  if paused ~= nil and paused.status == "True" then
    return report("Suspended", describe(paused))
  end
  return report("Suspended", "spec.paused is true: the operator leaves this tenant and its children as they are")
end

if obj.status == nil or obj.status.conditions == nil or #obj.status.conditions == 0 then
  return report("Progressing", "waiting for the operator to report status")
end

-- Conditions about an older spec say nothing about this one.
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  return report("Progressing", "waiting for the operator to reconcile the current spec "
    .. "(status.observedGeneration is behind metadata.generation)")
end

-- Problems that only a change to the spec, a Secret or another tenant fixes: waiting does not help. Except that
-- cert-manager issues the submission Secret only after the operator has requested it, and a Degraded tenant would
-- fail an Argo CD sync waiting on it. Without string functions the message cannot say which Secret is missing, so a
-- missing client CA Secret also shows as Progressing there; the message names it.
local config = condition("ConfigValid")
if config ~= nil and config.status == "False" then
  local tls = obj.spec ~= nil and obj.spec.submission ~= nil and obj.spec.submission.tls or nil
  if config.reason == "SecretMissing" and tls ~= nil and tls.issuerRef ~= nil and tls.secretName == nil then
    return report("Progressing", "waiting for cert-manager to issue the submission certificate: " .. describe(config))
  end
  return report("Degraded", describe(config))
end
local conflict = condition("IpPoolConflict")
if conflict ~= nil and conflict.status == "True" then
  return report("Degraded", describe(conflict))
end
local domains = condition("DomainConflict")
if domains ~= nil and domains.status == "True" then
  return report("Degraded", describe(domains))
end

local ready = condition("Ready")
if ready == nil then
  return report("Progressing", "waiting for the operator to report the Ready condition")
end
if ready.status == "True" then
  -- A blocklisting, and queue volumes not known to encrypt at rest while the spec does not require it, are kept out
  -- of Ready (the infrastructure is as configured) but are worth seeing here.
  local message = describe(ready)
  local listed = condition("IpListed")
  if listed ~= nil and listed.status == "True" then
    message = message .. "; " .. describe(listed)
  end
  local storage = condition("QueueStorageEncrypted")
  if storage ~= nil and storage.status ~= "True" then
    message = message .. "; " .. describe(storage)
  end
  return report("Healthy", message)
end
-- Reasons the operator resolves by itself: MTA pods starting (MtaAvailable False). Pods that cannot run
-- (ImagePullFailed, ContainerConfigInvalid, CrashLooping, Unschedulable, StuckPending) wait for someone to act.
local transient = { PodsNotReady = true }
if ready.status == "False" and not transient[ready.reason] then
  return report("Degraded", describe(ready))
end
return report("Progressing", describe(ready))
