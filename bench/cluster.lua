-- wrk script of bench/cluster: the two end-to-end loads, chosen by BENCH_LOAD.
--
--   push    distinct subscribe events under one signed query. In plaintext
--           mode WeChat signs only sha1(sorted token, timestamp, nonce), so
--           the query (in the URL given to wrk) stays valid for every body;
--           each request gets a FromUserName of its own (PUSH_PREFIX, the
--           thread, a counter), so each one is a new event that the app role
--           stores. CreateTime is PUSH_TIMESTAMP (the query's timestamp).
--   notify  one signed WeChat Pay notify replayed: the headers in the file
--           NOTIFY_HEADERS ("Name: value" lines) and the body in NOTIFY_BODY,
--           byte for byte (the signature covers it).
--
-- done() prints one machine-readable line:
--   WRK_RESULT requests seconds p50_ms p99_ms non2xx socket_errors

local threads = {}

function setup(thread)
    thread:set("thread_no", #threads + 1)
    table.insert(threads, thread)
end

local load = os.getenv("BENCH_LOAD") or "push"
local prefix, timestamp
local counter = 0

local function read_file(path)
    local f = assert(io.open(path, "rb"), "cannot open " .. tostring(path))
    local text = f:read("*a")
    f:close()
    return text
end

function init(args)
    wrk.method = "POST"
    if load == "push" then
        prefix = (os.getenv("PUSH_PREFIX") or "o_bench") .. "_" .. tostring(thread_no) .. "_"
        timestamp = assert(os.getenv("PUSH_TIMESTAMP"), "PUSH_TIMESTAMP is not set")
        wrk.headers["Content-Type"] = "text/xml"
    else
        for line in read_file(os.getenv("NOTIFY_HEADERS")):gmatch("[^\r\n]+") do
            local name, value = line:match("^([^:]+):%s*(.*)$")
            if name then
                wrk.headers[name] = value
            end
        end
        wrk.body = read_file(os.getenv("NOTIFY_BODY"))
    end
end

function request()
    if load ~= "push" then
        return wrk.request()
    end
    counter = counter + 1
    local body = "<xml><ToUserName>gh_bench</ToUserName><FromUserName>" .. prefix .. counter ..
        "</FromUserName><CreateTime>" .. timestamp ..
        "</CreateTime><MsgType>event</MsgType><Event>subscribe</Event></xml>"
    return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("WRK_RESULT %d %.3f %.2f %.2f %d %d\n",
        summary.requests, summary.duration / 1e6,
        latency:percentile(50) / 1000, latency:percentile(99) / 1000,
        e.status, e.connect + e.read + e.write + e.timeout))
end
