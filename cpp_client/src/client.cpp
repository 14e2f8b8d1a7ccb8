// The client functions of the C ABI: frame batching and polling over a Session.
#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "event.h"
#include "npcd_client.h"
#include "request.h"
#include "session.h"
#include "utf8.h"

struct npcd_client {
    std::unique_ptr<npcd::Session> session;
    uint64_t ticks_sent = 0;
    npcd::v1::Tick pending;  // this frame's requests and cancels
    std::vector<npcd::Event> delivered;  // backs the strings of the last poll
};

namespace {

bool pending_request(const npcd_client* client, const std::string& id) {
    const auto& requests = client->pending.requests();
    return std::any_of(requests.begin(), requests.end(),
                       [&](const npcd::v1::SayRequest& r) { return r.request_id() == id; });
}

}  // namespace

extern "C" {

npcd_client* npcd_client_new(const char* address, uint32_t initial_backoff_ms,
                             uint32_t max_backoff_ms) {
    if (!npcd::is_utf8(address) || *address == 0) return nullptr;
    const std::chrono::milliseconds initial(initial_backoff_ms ? initial_backoff_ms : 250);
    const std::chrono::milliseconds max(max_backoff_ms ? max_backoff_ms : 5000);
    auto* client = new npcd_client;
    client->session = std::make_unique<npcd::Session>(address, initial, max);
    return client;
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
    *client->pending.add_requests() = request->message;
    return NPCD_OK;
}

npcd_status npcd_cancel(npcd_client* client, const char* request_id) {
    if (client == nullptr || !npcd::is_utf8(request_id)) return NPCD_ERR_INVALID_ARGUMENT;
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
    }
    return n;
}

}  // extern "C"
