// The request builder functions of the C ABI.
#include "request.h"

#include <atomic>
#include <cstdio>
#include <random>
#include <string>

#include "npcd_client.h"
#include "utf8.h"

namespace {

// Ids unique in this process and, thanks to the random prefix, unlikely to
// meet another process's ids on the same daemon.
std::string next_request_id() {
    static const unsigned prefix = std::random_device{}();
    static std::atomic<unsigned long long> counter{0};
    char buf[48];
    std::snprintf(buf, sizeof buf, "c%08x-%llu", prefix, ++counter);
    return buf;
}

// Returns the status of a refused string argument (INVALID_ARGUMENT or INVALID_UTF8).
#define CHECK_STRING(s, required)                                \
    do {                                                         \
        const npcd_status status_ = npcd::check_string(s, required); \
        if (status_ != NPCD_OK) return status_;                  \
    } while (0)

npcd::v1::SamplingOverrides* sampling(npcd_request* r) {
    return r->message.mutable_sampling();
}

}  // namespace

extern "C" {

npcd_request* npcd_request_new(const char* persona, const char* line) {
    const npcd_status p = npcd::check_string(persona, true);
    const npcd_status l = npcd::check_string(line, false);
    if (p != NPCD_OK || l != NPCD_OK) {
        npcd::set_last_error(p == NPCD_ERR_INVALID_ARGUMENT ? "npcd_request_new: persona is NULL or empty"
                             : p == NPCD_ERR_INVALID_UTF8   ? "npcd_request_new: persona is not valid UTF-8"
                             : l == NPCD_ERR_INVALID_ARGUMENT ? "npcd_request_new: line is NULL"
                                                              : "npcd_request_new: line is not valid UTF-8");
        return nullptr;
    }
    npcd::set_last_error("");
    auto* r = new npcd_request;
    r->message.set_request_id(next_request_id());
    r->message.set_persona(persona);
    r->message.set_line(line);
    return r;
}

void npcd_request_free(npcd_request* request) { delete request; }

const char* npcd_request_id(const npcd_request* request) {
    return request == nullptr ? nullptr : request->message.request_id().c_str();
}

npcd_status npcd_request_set_id(npcd_request* request, const char* request_id) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    CHECK_STRING(request_id, true);
    request->message.set_request_id(request_id);
    return NPCD_OK;
}

npcd_status npcd_request_set_npc_id(npcd_request* request, const char* npc_id) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    CHECK_STRING(npc_id, false);
    request->message.set_npc_id(npc_id);
    return NPCD_OK;
}

npcd_status npcd_request_set_speaker(npcd_request* request, const char* speaker) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    CHECK_STRING(speaker, false);
    request->message.set_speaker(speaker);
    return NPCD_OK;
}

npcd_status npcd_request_add_history(npcd_request* request, const char* speaker,
                                     const char* text) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    CHECK_STRING(speaker, false);
    CHECK_STRING(text, false);
    auto* turn = request->message.add_history();
    turn->set_speaker(speaker);
    turn->set_text(text);
    return NPCD_OK;
}

npcd_status npcd_request_set_context(npcd_request* request, const char* key, const char* value) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    CHECK_STRING(key, true);
    CHECK_STRING(value, false);
    (*request->message.mutable_context())[key] = value;
    return NPCD_OK;
}

npcd_status npcd_request_set_priority(npcd_request* request, int32_t priority) {
    if (request == nullptr ||
        (priority != NPCD_PRIORITY_AMBIENT && priority != NPCD_PRIORITY_PLAYER))
        return NPCD_ERR_INVALID_ARGUMENT;
    request->message.set_priority(static_cast<npcd::v1::Priority>(priority));
    return NPCD_OK;
}

npcd_status npcd_request_set_segmentation(npcd_request* request, int32_t segmentation) {
    if (request == nullptr || !npcd::v1::Segmentation_IsValid(segmentation)) return NPCD_ERR_INVALID_ARGUMENT;
    request->message.set_segmentation(static_cast<npcd::v1::Segmentation>(segmentation));
    return NPCD_OK;
}

npcd_status npcd_request_set_conversation(npcd_request* request, const char* conversation) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    CHECK_STRING(conversation, false);
    request->message.set_conversation(conversation);
    return NPCD_OK;
}

npcd_status npcd_request_set_deadline_ms(npcd_request* request, uint32_t deadline_ms) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    request->message.set_deadline_ms(deadline_ms);
    return NPCD_OK;
}

npcd_status npcd_request_set_max_tokens(npcd_request* request, uint32_t max_tokens) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    sampling(request)->set_max_tokens(max_tokens);
    return NPCD_OK;
}

npcd_status npcd_request_set_temperature(npcd_request* request, float temperature) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    sampling(request)->set_temperature(temperature);
    return NPCD_OK;
}

npcd_status npcd_request_set_top_p(npcd_request* request, float top_p) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    sampling(request)->set_top_p(top_p);
    return NPCD_OK;
}

npcd_status npcd_request_set_top_k(npcd_request* request, uint32_t top_k) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    sampling(request)->set_top_k(top_k);
    return NPCD_OK;
}

npcd_status npcd_request_set_repetition_penalty(npcd_request* request, float penalty) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    sampling(request)->set_repetition_penalty(penalty);
    return NPCD_OK;
}

npcd_status npcd_request_set_seed(npcd_request* request, uint64_t seed) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    sampling(request)->set_seed(seed);
    return NPCD_OK;
}

npcd_status npcd_request_add_stop(npcd_request* request, const char* stop) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    CHECK_STRING(stop, true);
    sampling(request)->add_stop(stop);
    return NPCD_OK;
}

npcd_status npcd_request_set_structured(npcd_request* request, int32_t on) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    request->message.set_structured(on != 0);
    return NPCD_OK;
}

npcd_status npcd_request_add_action(npcd_request* request, const char* name,
                                    const char* description, const char* args_schema_json) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    CHECK_STRING(name, true);
    if (description != nullptr) CHECK_STRING(description, false);
    if (args_schema_json != nullptr) CHECK_STRING(args_schema_json, false);
    auto* action = request->message.add_actions();
    action->set_name(name);
    if (description != nullptr) action->set_description(description);
    if (args_schema_json != nullptr) action->set_args_schema_json(args_schema_json);
    return NPCD_OK;
}

npcd_status npcd_request_set_response_format(npcd_request* request, const char* schema_json) {
    if (request == nullptr) return NPCD_ERR_INVALID_ARGUMENT;
    CHECK_STRING(schema_json, false);
    request->message.set_response_format(schema_json);
    return NPCD_OK;
}

}  // extern "C"
