--[[
trainplan's Slurm hook. slurmctld runs slurm_job_submit for every submission; a batch script
with a line

    #TRAINPLAN {"model": {...}, "data": {...}, "training": {...}, "device": {...}}

(a plan spec as JSON, on one line) is planned by trainplan (POST /v1/integrations/slurm/submit,
which reuses the plan of a spec it has seen), and the job is admitted with the plan's nodes,
GPUs per node (tres_per_node "gres/gpu:N", Slurm 23.02+'s spelling) and numbers exported at the
top of its script (MICRO_BATCH_SIZE, GRAD_ACCUM_STEPS, LEARNING_RATE, TRAINPLAN_PLAN_ID); its
comment gets "trainplan-plan=<id>". A refused spec or a plan that does not fit rejects the job
with the reason (slurm.log_user). A plan not done within the service's wait
(TRAINPLAN_ADMISSION_WAIT_SECONDS), or a service that does not answer, admits the job unchanged
(ON_TIMEOUT "allow") or rejects it ("deny"); submitting again picks the plan up.

Install: copy to the directory of slurm.conf, set JobSubmitPlugins=lua there, put an API key
with the "submit" scope in KEY_FILE (readable by SlurmUser only), and set URL below. Needs curl
on the controller. The TRAINPLAN_* environment variables override the settings (for tests).
--]]

local URL = os.getenv("TRAINPLAN_URL") or "http://trainplan.internal:8000"
local KEY_FILE = os.getenv("TRAINPLAN_KEY_FILE") or "/etc/slurm/trainplan.key"
local ON_TIMEOUT = os.getenv("TRAINPLAN_ON_TIMEOUT") or "allow" -- allow | deny
local CURL_SECONDS = 30 -- above the service's wait, below slurmctld's patience

local EXPORTED = { "MICRO_BATCH_SIZE", "GRAD_ACCUM_STEPS", "LEARNING_RATE", "TRAINPLAN_PLAN_ID" }

-- The spec a script carries, or nil.
local function spec_of(script)
	if script == nil then
		return nil
	end
	return ("\n" .. script):match("\n#TRAINPLAN[ \t]+([^\n]+)")
end

local function write_private(text)
	local path = os.tmpname() -- mkstemp: mode 0600
	local file = assert(io.open(path, "w"))
	file:write(text)
	file:close()
	return path
end

local function read_key()
	local file = io.open(KEY_FILE, "r")
	if file == nil then
		return nil
	end
	local key = file:read("l")
	file:close()
	return key
end

-- The service's answer as a table of key=value lines (a refused spec's come with a 4xx); nil
-- and a reason when it gave none (a 401's problem details, a refused connection ...).
local function ask(spec)
	local body = write_private(spec)
	local header = "Content-Type: application/json\n"
	local key = read_key()
	if key ~= nil then
		header = header .. "Authorization: Bearer " .. key .. "\n"
	end
	local headers = write_private(header)
	local command = string.format(
		"curl -sS --max-time %d -X POST -H @%s --data-binary @%s '%s/v1/integrations/slurm/submit' 2>&1",
		CURL_SECONDS,
		headers,
		body,
		URL
	)
	local pipe = io.popen(command, "r")
	local output = pipe:read("a")
	local ok = pipe:close()
	os.remove(body)
	os.remove(headers)
	local answer = {}
	for line in output:gmatch("[^\n]+") do
		local k, v = line:match("^([%w_]+)=(.*)$")
		if k ~= nil then
			answer[k] = v
		end
	end
	if not ok or answer.decision == nil then
		return nil, "trainplan did not answer: " .. output:sub(1, 300)
	end
	return answer
end

local function admit(job_desc, answer)
	local nodes = tonumber(answer.nodes)
	job_desc.min_nodes = nodes
	job_desc.max_nodes = nodes
	job_desc.tres_per_node = "gres/gpu:" .. answer.gpus_per_node
	local exports = {}
	for _, name in ipairs(EXPORTED) do
		-- the values are numbers and an id: nothing a single quote would need escaping for
		exports[#exports + 1] = string.format("export %s='%s'", name, answer[name])
	end
	local script = job_desc.script
	local shebang, rest = script:match("^(#![^\n]*\n)(.*)$")
	if shebang == nil then
		shebang, rest = "", script
	end
	job_desc.script = shebang .. table.concat(exports, "\n") .. "\n" .. rest
	local note = "trainplan-plan=" .. answer.plan_id
	if job_desc.comment ~= nil and job_desc.comment ~= "" then
		note = job_desc.comment .. " " .. note
	end
	job_desc.comment = note
end

local function undecided(message)
	slurm.log_user("%s", message)
	if ON_TIMEOUT == "deny" then
		return slurm.ERROR
	end
	return slurm.SUCCESS
end

function slurm_job_submit(job_desc, part_list, submit_uid)
	local spec = spec_of(job_desc.script)
	if spec == nil then
		return slurm.SUCCESS -- not a trainplan job
	end
	local answer, reason = ask(spec)
	if answer == nil then
		return undecided(reason)
	end
	if answer.decision == "accept" then
		admit(job_desc, answer)
		slurm.log_info("trainplan: job of uid %d gets plan %s", submit_uid, answer.plan_id)
		return slurm.SUCCESS
	end
	if answer.decision == "pending" then
		return undecided(answer.message)
	end
	slurm.log_user("%s", answer.message or "trainplan: rejected")
	return slurm.ERROR
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
	return slurm.SUCCESS
end

return slurm.SUCCESS
