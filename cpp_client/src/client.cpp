// The client functions of the C ABI: frame batching and polling over a Session.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "client.h"
#include "event.h"
#include "npcd_client.h"
#include "request.h"
#include "session.h"
#include "utf8.h"

namespace {

bool pending_request(const npcd_client* client, const std::string& id) {
    const auto& requests = client->pending.requests();
    return std::any_of(requests.begin(), requests.end(),
                       [&](const npcd::v1::SayRequest& r) { return r.request_id() == id; });
}

bool all_digits(const std::string& s) {
    return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// "" when "host:port" (or "[v6]:port") parses; else why not. Port required unless port_optional.
std::string check_host_port(const std::string& a, bool port_optional) {
    std::string host, port;
    bool has_port = false;
    if (!a.empty() && a[0] == '[') {
        const size_t close = a.find(']');
        if (close == std::string::npos) return "'[' without ']'";
        host = a.substr(1, close - 1);
        if (close + 1 < a.size()) {
            if (a[close + 1] != ':') return "expected ':' after ']'";
            port = a.substr(close + 2);
            has_port = true;
        }
    } else {
        const size_t colon = a.rfind(':');
        if (colon != std::string::npos) {
            host = a.substr(0, colon);
            port = a.substr(colon + 1);
            has_port = true;
            if (host.find(':') != std::string::npos) return "an IPv6 address goes in brackets: [::1]:50051";
        } else {
            host = a;
        }
    }
    if (host.empty()) return "no host";
    if (!has_port) return port_optional ? "" : "no port (want host:port, e.g. 127.0.0.1:50051)";
    if (!all_digits(port) || port.size() > 5) return "the port '" + port + "' is not a number";
    const long n = std::stol(port);
    if (n < 1 || n > 65535) return "the port " + port + " is not in 1..65535";
    return "";
}

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// "" when the address parses: host:port, [v6]:port, or the gRPC URIs dns:, ipv4:, ipv6:, unix:.
std::string check_address(const std::string& a) {
    if (a.empty()) return "the address is empty";
    if (starts_with(a, "unix:") || starts_with(a, "unix-abstract:"))
        return a.substr(a.find(':') + 1).empty() ? "a unix: address without a path" : "";
    if (starts_with(a, "ipv4:") || starts_with(a, "ipv6:")) {
        std::string rest = a.substr(5);
        size_t start = 0;
        for (;;) {
            const size_t comma = rest.find(',', start);
            const std::string why = check_host_port(rest.substr(start, comma - start), false);
            if (!why.empty()) return why;
            if (comma == std::string::npos) return "";
            start = comma + 1;
        }
    }
    if (starts_with(a, "dns:")) {
        std::string rest = a.substr(4);
        if (starts_with(rest, "//")) {  // dns://authority/host:port
            const size_t slash = rest.find('/', 2);
            if (slash == std::string::npos) return "dns://authority without /host:port";
            rest = rest.substr(slash + 1);
        }
        return check_host_port(rest, true);  // gRPC's dns resolver defaults the port to 443
    }
    return check_host_port(a, false);
}

npcd_client* fail_new(npcd_status status, const std::string& why, npcd_status* status_out) {
    npcd::set_last_error(why);
    if (status_out != nullptr) *status_out = status;
    return nullptr;
}

// An optional string field: NULL and "" are none.
npcd_status optional_string(const char* s, const char* field, std::string* out, std::string* why) {
    if (s == nullptr) return NPCD_OK;
    if (!npcd::is_utf8(s)) {
        *why = std::string(field) + " is not valid UTF-8";
        return NPCD_ERR_INVALID_UTF8;
    }
    *out = s;
    return NPCD_OK;
}

}  // namespace

npcd_status npcd::rpc_outcome(const grpc::Status& status, const char* call, int32_t* rpc_code_out) {
    if (rpc_code_out != nullptr) *rpc_code_out = status.error_code();
    if (status.ok()) {
        set_last_error("");
        return NPCD_OK;
    }
    set_last_error(std::string(call) + " failed with gRPC code " + std::to_string(status.error_code()) + ": " +
                   status.error_message());
    return NPCD_ERR_RPC;
}

extern "C" {

npcd_client* npcd_client_new_with_options(const npcd_client_options* options, npcd_status* status_out) {
    if (options == nullptr) return fail_new(NPCD_ERR_INVALID_ARGUMENT, "options is NULL", status_out);
    // The first version of the struct is all of it so far; fields appended later must be read only
    // when options->struct_size covers them.
    if (options->struct_size < sizeof(npcd_client_options))
        return fail_new(NPCD_ERR_INVALID_ARGUMENT,
                        "options.struct_size is too small: fill the options with npcd_client_options_init first",
                        status_out);
    npcd::SessionOptions o;
    const npcd_status a = npcd::check_string(options->address, true);
    if (a != NPCD_OK)
        return fail_new(a, a == NPCD_ERR_INVALID_UTF8 ? "address is not valid UTF-8" : "address is NULL or empty",
                        status_out);
    o.address = options->address;
    const std::string bad_address = check_address(o.address);
    if (!bad_address.empty())
        return fail_new(NPCD_ERR_INVALID_ADDRESS, "address '" + o.address + "': " + bad_address, status_out);
    std::string why;
    struct Field {
        const char* value;
        const char* name;
        std::string* out;
    } fields[] = {{options->token, "token", &o.token},
                  {options->root_certs_pem, "root_certs_pem", &o.root_certs_pem},
                  {options->client_cert_pem, "client_cert_pem", &o.client_cert_pem},
                  {options->client_key_pem, "client_key_pem", &o.client_key_pem},
                  {options->tls_server_name, "tls_server_name", &o.tls_server_name}};
    for (const auto& f : fields) {
        const npcd_status st = optional_string(f.value, f.name, f.out, &why);
        if (st != NPCD_OK) return fail_new(st, why, status_out);
    }
    // an HTTP/2 header value, and nothing that could split or pad it
    if (!std::all_of(o.token.begin(), o.token.end(), [](char c) { return c > 0x20 && c < 0x7f; }))
        return fail_new(NPCD_ERR_INVALID_ARGUMENT, "token must be printable ASCII without spaces", status_out);
    o.tls = options->tls != 0;
    if (!o.tls && !(o.root_certs_pem.empty() && o.client_cert_pem.empty() && o.client_key_pem.empty() &&
                    o.tls_server_name.empty()))
        return fail_new(NPCD_ERR_INVALID_ARGUMENT,
                        "root_certs_pem, client_cert_pem, client_key_pem and tls_server_name need tls != 0",
                        status_out);
    if (o.client_cert_pem.empty() != o.client_key_pem.empty())
        return fail_new(NPCD_ERR_INVALID_ARGUMENT, "client_cert_pem and client_key_pem go together (mutual TLS)",
                        status_out);
    o.initial_backoff = std::chrono::milliseconds(options->initial_backoff_ms ? options->initial_backoff_ms : 250);
    o.max_backoff = std::chrono::milliseconds(options->max_backoff_ms ? options->max_backoff_ms : 5000);
    o.connect_queue_max = options->connect_queue_max ? options->connect_queue_max : 64;
    o.connect_queue_timeout =
        std::chrono::milliseconds(options->connect_queue_timeout_ms ? options->connect_queue_timeout_ms : 10000);
    npcd::set_last_error("");
    if (status_out != nullptr) *status_out = NPCD_OK;
    auto* client = new npcd_client;
    client->session = std::make_unique<npcd::Session>(std::move(o));
    return client;
}

npcd_client* npcd_client_new(const char* address, uint32_t initial_backoff_ms,
                             uint32_t max_backoff_ms) {
    npcd_client_options options;
    npcd_client_options_init(&options);
    options.address = address;
    options.initial_backoff_ms = initial_backoff_ms;
    options.max_backoff_ms = max_backoff_ms;
    return npcd_client_new_with_options(&options, nullptr);
}

void npcd_client_free(npcd_client* client) { delete client; }

int32_t npcd_client_state(const npcd_client* client) {
    return client == nullptr ? NPCD_DISCONNECTED : client->session->state();
}

npcd_status npcd_submit(npcd_client* client, const npcd_request* request) {
    if (client == nullptr || request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    const std::string& id = request->message.request_id();
    if (pending_request(client, id) || client->session->in_flight(id))
        return NPCD_ERR_DUPLICATE_ID;
    // A Tick over gRPC's message limit would end the whole Session stream: refuse the request
    // here. A frame of requests that fit one by one is split by the session (split_tick).
    const size_t bytes = request->message.ByteSizeLong();
    if (bytes > NPCD_MAX_REQUEST_BYTES) {
        npcd::set_last_error("request " + id + " is " + std::to_string(bytes) +
                             " bytes serialized; the limit is " + std::to_string(NPCD_MAX_REQUEST_BYTES) +
                             " bytes (NPCD_MAX_REQUEST_BYTES: gRPC's 4194304-byte message limit less the Tick "
                             "envelope); shorten the line, history or context. Nothing was sent");
        return NPCD_ERR_TOO_LARGE;
    }
    npcd::set_last_error("");
    *client->pending.add_requests() = request->message;
    return NPCD_OK;
}

npcd_status npcd_cancel(npcd_client* client, const char* request_id) {
    if (client == nullptr || request_id == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    if (!npcd::is_utf8(request_id)) return NPCD_ERR_INVALID_UTF8;
    auto* requests = client->pending.mutable_requests();
    for (auto it = requests->begin(); it != requests->end(); ++it) {
        if (it->request_id() == request_id) {
            requests->erase(it);
            client->session->post(npcd::Event::cancelled(request_id));
            return NPCD_OK;
        }
    }
    if (!client->session->in_flight(request_id)) return NPCD_ERR_UNKNOWN_REQUEST;
    client->pending.add_cancels()->set_request_id(request_id);
    return NPCD_OK;
}

void npcd_flush(npcd_client* client) {
    if (client == nullptr) return;
    if (client->pending.requests_size() == 0 && client->pending.cancels_size() == 0) return;
    client->pending.set_tick(++client->ticks_sent);
    client->session->send(std::move(client->pending));
    client->pending.Clear();
}

int32_t npcd_poll(npcd_client* client, npcd_event* events_out, int32_t max) {
    if (client == nullptr) return 0;
    npcd_flush(client);
    client->delivered.clear();
    if (events_out == nullptr || max <= 0) return 0;
    client->session->take(&client->delivered, static_cast<size_t>(max));
    int32_t n = 0;
    for (const auto& e : client->delivered) {
        npcd_event& out = events_out[n++];
        out.request_id = e.request_id.c_str();
        out.text = e.text.c_str();
        out.error_status = e.error_status.c_str();
        out.kind = e.kind;
        out.finish_reason = e.finish_reason;
        out.error_code = e.error_code;
        out.queue_position = e.queue_position;
        out.prompt_tokens = e.prompt_tokens;
        out.completion_tokens = e.completion_tokens;
        out.queued_ms = e.queued_ms;
        out.first_token_ms = e.first_token_ms;
        out.total_ms = e.total_ms;
        out.json = e.json.c_str();
        out.action_name = e.action_name.c_str();
        out.action_args_json = e.action_args_json.c_str();
        out.emotion = e.emotion.c_str();
        out.retry_after_ms = e.retry_after_ms;
        out.sentence_index = e.sentence_index;
        out.cached_prompt_tokens = e.cached_prompt_tokens;
        out.history_turns = e.history_turns;
    }
    return n;
}

}  // extern "C"
