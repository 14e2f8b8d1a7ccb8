// The conversations of the C ABI: a save game's blob out and back in, reading one, adding a turn, replacing its
// turns, and a reset, each one unary call.
#include <string>
#include <vector>

#include "client.h"
#include "npcd_client.h"
#include "utf8.h"

struct npcd_blob {
    std::string data;
    uint32_t conversations = 0;
};

struct npcd_conversation {
    npcd::v1::Conversation message;  // owns the strings the turns point into; never changed after it is filled
    std::vector<npcd_turn> turns;
};

namespace {

// A string argument as npcd::check_string judges it (NULL refused, malformed UTF-8 refused), with the field
// named in npcd_last_error() when it is refused.
npcd_status checked(const char* field, const char* s) {
    const npcd_status status = npcd::check_string(s, false);
    if (status != NPCD_OK)
        npcd::set_last_error(std::string(field) + (status == NPCD_ERR_INVALID_UTF8 ? " is not valid UTF-8" : " is NULL"));
    return status;
}

// The reference a conversation is named by: NPCD_OK, or the first refused field, named.
npcd_status make_ref(const char* conversation, const char* persona, npcd::v1::ConversationRef* ref) {
    if (const npcd_status bad = checked("conversation", conversation); bad != NPCD_OK) return bad;
    if (const npcd_status bad = checked("persona", persona); bad != NPCD_OK) return bad;
    ref->set_conversation(conversation);
    ref->set_persona(persona);
    return NPCD_OK;
}

}  // namespace

extern "C" {

npcd_status npcd_export_conversations(npcd_client* client, const char* persona, uint32_t timeout_ms,
                                      npcd_blob** blob_out, int32_t* rpc_code_out) {
    if (rpc_code_out != nullptr) *rpc_code_out = 0;
    if (client == nullptr || blob_out == nullptr) {
        npcd::set_last_error(client == nullptr ? "client is NULL" : "blob_out is NULL");
        return NPCD_ERR_INVALID_ARGUMENT;
    }
    *blob_out = nullptr;
    if (persona != nullptr)  // NULL: every persona's
        if (const npcd_status bad = checked("persona", persona); bad != NPCD_OK) return bad;
    npcd::v1::ExportConversationsRequest request;
    if (persona != nullptr) request.set_persona(persona);
    npcd::v1::ConversationsBlob response;
    const npcd_status outcome = npcd::rpc_outcome(
        client->session->call(&npcd::v1::Npcd::Stub::ExportConversations, request, npcd::call_timeout(timeout_ms),
                              &response),
        "ExportConversations", rpc_code_out);
    if (outcome != NPCD_OK) return outcome;
    *blob_out = new npcd_blob{std::move(*response.mutable_data()), response.conversations()};
    return NPCD_OK;
}

const uint8_t* npcd_blob_data(const npcd_blob* blob) {
    return blob == nullptr ? nullptr : reinterpret_cast<const uint8_t*>(blob->data.data());
}

uint64_t npcd_blob_size(const npcd_blob* blob) { return blob == nullptr ? 0 : blob->data.size(); }

uint32_t npcd_blob_conversations(const npcd_blob* blob) { return blob == nullptr ? 0 : blob->conversations; }

void npcd_blob_free(npcd_blob* blob) { delete blob; }

npcd_status npcd_import_conversations(npcd_client* client, const uint8_t* data, uint64_t size, int32_t replace,
                                      uint32_t timeout_ms, uint32_t* imported_out, int32_t* rpc_code_out) {
    if (rpc_code_out != nullptr) *rpc_code_out = 0;
    if (imported_out != nullptr) *imported_out = 0;
    if (client == nullptr || (data == nullptr && size > 0)) {
        npcd::set_last_error(client == nullptr ? "client is NULL" : "data is NULL with a size");
        return NPCD_ERR_INVALID_ARGUMENT;
    }
    if (size > NPCD_MAX_REQUEST_BYTES) {
        npcd::set_last_error("the blob has " + std::to_string(size) + " bytes; one call carries at most " +
                             std::to_string(NPCD_MAX_REQUEST_BYTES));
        return NPCD_ERR_TOO_LARGE;
    }
    npcd::v1::ImportConversationsRequest request;
    if (size > 0) request.set_data(reinterpret_cast<const char*>(data), size);
    request.set_replace(replace != 0);
    npcd::v1::ImportConversationsResponse response;
    const npcd_status outcome = npcd::rpc_outcome(
        client->session->call(&npcd::v1::Npcd::Stub::ImportConversations, request, npcd::call_timeout(timeout_ms),
                              &response),
        "ImportConversations", rpc_code_out);
    if (outcome == NPCD_OK && imported_out != nullptr) *imported_out = response.conversations();
    return outcome;
}

npcd_status npcd_reset_conversation(npcd_client* client, const char* conversation, const char* persona,
                                    uint32_t timeout_ms, int32_t* rpc_code_out) {
    if (rpc_code_out != nullptr) *rpc_code_out = 0;
    if (client == nullptr) {
        npcd::set_last_error("client is NULL");
        return NPCD_ERR_INVALID_ARGUMENT;
    }
    npcd::v1::ConversationRef request;
    if (const npcd_status bad = make_ref(conversation, persona, &request); bad != NPCD_OK) return bad;
    npcd::v1::Conversation response;
    return npcd::rpc_outcome(client->session->call(&npcd::v1::Npcd::Stub::ResetConversation, request,
                                                   npcd::call_timeout(timeout_ms), &response),
                             "ResetConversation", rpc_code_out);
}

npcd_status npcd_get_conversation(npcd_client* client, const char* conversation, const char* persona,
                                  uint32_t timeout_ms, npcd_conversation** conversation_out, int32_t* rpc_code_out) {
    if (rpc_code_out != nullptr) *rpc_code_out = 0;
    if (client == nullptr || conversation_out == nullptr) {
        npcd::set_last_error(client == nullptr ? "client is NULL" : "conversation_out is NULL");
        return NPCD_ERR_INVALID_ARGUMENT;
    }
    *conversation_out = nullptr;
    npcd::v1::ConversationRef request;
    if (const npcd_status bad = make_ref(conversation, persona, &request); bad != NPCD_OK) return bad;
    auto* out = new npcd_conversation;
    const npcd_status outcome = npcd::rpc_outcome(
        client->session->call(&npcd::v1::Npcd::Stub::GetConversation, request, npcd::call_timeout(timeout_ms),
                              &out->message),
        "GetConversation", rpc_code_out);
    if (outcome != NPCD_OK) {
        delete out;
        return outcome;
    }
    for (const auto& turn : out->message.turns())
        out->turns.push_back({turn.speaker().c_str(), turn.text().c_str(), turn.npc() ? 1 : 0});
    *conversation_out = out;
    return NPCD_OK;
}

int32_t npcd_conversation_turn_count(const npcd_conversation* conversation) {
    return conversation == nullptr ? 0 : static_cast<int32_t>(conversation->turns.size());
}

const npcd_turn* npcd_conversation_turn(const npcd_conversation* conversation, int32_t index) {
    if (index < 0 || index >= npcd_conversation_turn_count(conversation)) return nullptr;
    return &conversation->turns[index];
}

const char* npcd_conversation_summary(const npcd_conversation* conversation) {
    return conversation == nullptr ? "" : conversation->message.summary().c_str();
}

void npcd_conversation_free(npcd_conversation* conversation) { delete conversation; }

npcd_status npcd_add_turn(npcd_client* client, const char* conversation, const char* persona, const char* speaker,
                          const char* text, int32_t npc, uint32_t timeout_ms, int32_t* rpc_code_out) {
    if (rpc_code_out != nullptr) *rpc_code_out = 0;
    if (client == nullptr) {
        npcd::set_last_error("client is NULL");
        return NPCD_ERR_INVALID_ARGUMENT;
    }
    npcd::v1::AddTurnsRequest request;
    if (const npcd_status bad = make_ref(conversation, persona, request.mutable_ref()); bad != NPCD_OK) return bad;
    if (const npcd_status bad = checked("speaker", speaker); bad != NPCD_OK) return bad;
    if (const npcd_status bad = checked("text", text); bad != NPCD_OK) return bad;
    npcd::v1::ConversationTurn* turn = request.add_turns();
    turn->set_speaker(speaker);
    turn->set_text(text);
    turn->set_npc(npc != 0);
    npcd::v1::Conversation response;
    return npcd::rpc_outcome(client->session->call(&npcd::v1::Npcd::Stub::AddTurns, request,
                                                   npcd::call_timeout(timeout_ms), &response),
                             "AddTurns", rpc_code_out);
}

npcd_status npcd_set_conversation(npcd_client* client, const char* conversation, const char* persona,
                                  const npcd_turn* turns, int32_t count, const char* summary, uint32_t timeout_ms,
                                  int32_t* rpc_code_out) {
    if (rpc_code_out != nullptr) *rpc_code_out = 0;
    if (client == nullptr || count < 0 || (count > 0 && turns == nullptr)) {
        npcd::set_last_error(client == nullptr ? "client is NULL"
                             : count < 0       ? "count is negative: " + std::to_string(count)
                                               : "turns is NULL with count " + std::to_string(count));
        return NPCD_ERR_INVALID_ARGUMENT;
    }
    npcd::v1::ConversationRef ref;
    if (const npcd_status bad = make_ref(conversation, persona, &ref); bad != NPCD_OK) return bad;
    npcd::v1::Conversation request;
    request.set_conversation(ref.conversation());
    request.set_persona(ref.persona());
    if (summary != nullptr) {
        if (const npcd_status bad = checked("summary", summary); bad != NPCD_OK) return bad;
        request.set_summary(summary);
    }
    for (int32_t i = 0; i < count; ++i) {
        const std::string field = "turns[" + std::to_string(i) + "]";
        if (const npcd_status bad = checked((field + ".speaker").c_str(), turns[i].speaker); bad != NPCD_OK) return bad;
        if (const npcd_status bad = checked((field + ".text").c_str(), turns[i].text); bad != NPCD_OK) return bad;
        npcd::v1::ConversationTurn* turn = request.add_turns();
        turn->set_speaker(turns[i].speaker);
        turn->set_text(turns[i].text);
        turn->set_npc(turns[i].npc != 0);
    }
    npcd::v1::Conversation response;
    return npcd::rpc_outcome(client->session->call(&npcd::v1::Npcd::Stub::SetConversation, request,
                                                   npcd::call_timeout(timeout_ms), &response),
                             "SetConversation", rpc_code_out);
}

}  // extern "C"
