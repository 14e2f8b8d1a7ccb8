// The persona listing of the C ABI: one ListPersonas call, its answer copied into strings the list owns.
#include <string>
#include <vector>

#include <google/protobuf/util/json_util.h>

#include "client.h"
#include "npcd_client.h"
#include "utf8.h"

namespace {

struct PersonaStrings {
    std::string id, display_name, description, metadata_json, error;
};

}  // namespace

struct npcd_persona_list {
    std::vector<PersonaStrings> strings;
    std::vector<npcd_persona> personas;  // points into strings, which never grows after it is filled
};

extern "C" {

npcd_status npcd_list_personas(npcd_client* client, uint32_t timeout_ms, npcd_persona_list** list_out,
                               int32_t* rpc_code_out) {
    if (rpc_code_out != nullptr) *rpc_code_out = 0;
    if (client == nullptr || list_out == nullptr) {
        npcd::set_last_error(client == nullptr ? "client is NULL" : "list_out is NULL");
        return NPCD_ERR_INVALID_ARGUMENT;
    }
    *list_out = nullptr;
    npcd::v1::ListPersonasResponse response;
    const npcd_status outcome = npcd::rpc_outcome(
        client->session->call(&npcd::v1::Npcd::Stub::ListPersonas, npcd::v1::ListPersonasRequest(),
                              npcd::call_timeout(timeout_ms), &response),
        "ListPersonas", rpc_code_out);
    if (outcome != NPCD_OK) return outcome;
    auto* list = new npcd_persona_list;
    list->strings.reserve(response.personas_size());  // never reallocated below: personas point into it
    for (const auto& p : response.personas()) {
        PersonaStrings& s = list->strings.emplace_back(PersonaStrings{p.id(), p.display_name(), p.description(), "{}", p.error()});
        if (p.has_metadata()) {
            google::protobuf::util::JsonPrintOptions compact;
            if (!google::protobuf::util::MessageToJsonString(p.metadata(), &s.metadata_json, compact).ok())
                s.metadata_json = "{}";
        }
        list->personas.push_back({s.id.c_str(), s.display_name.c_str(), s.description.c_str(),
                                  s.metadata_json.c_str(), s.error.c_str(), p.status(), p.has_adapter() ? 1 : 0});
    }
    *list_out = list;
    return NPCD_OK;
}

int32_t npcd_persona_list_count(const npcd_persona_list* list) {
    return list == nullptr ? 0 : static_cast<int32_t>(list->personas.size());
}

const npcd_persona* npcd_persona_list_get(const npcd_persona_list* list, int32_t index) {
    if (list == nullptr || index < 0 || index >= npcd_persona_list_count(list)) return nullptr;
    return &list->personas[index];
}

void npcd_persona_list_free(npcd_persona_list* list) { delete list; }

}  // extern "C"
