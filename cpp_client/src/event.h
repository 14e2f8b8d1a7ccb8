// One event as the game receives it, decoupled from the wire types.
#pragma once

#include <cstdint>
#include <string>

#include "npcd/v1/npcd.pb.h"

namespace npcd {

struct Event {
    int32_t kind = 0;  // npcd_event_kind
    std::string request_id;
    std::string text;
    std::string error_status;
    int32_t finish_reason = 0;
    int32_t error_code = 0;
    uint32_t queue_position = 0;
    uint32_t prompt_tokens = 0;
    uint32_t completion_tokens = 0;
    float queued_ms = 0;
    float first_token_ms = 0;
    float total_ms = 0;
    std::string json;  // FINISHED
    std::string action_name;  // ACTION, FINISHED
    std::string action_args_json;
    std::string emotion;  // EMOTION, FINISHED
    uint32_t retry_after_ms = 0;  // ERROR (RESOURCE_EXHAUSTED)
    uint32_t sentence_index = 0;  // SENTENCE (its text is in text)
    uint32_t cached_prompt_tokens = 0;  // FINISHED
    uint32_t history_turns = 0;

    bool terminal() const;

    // The event a wire Event maps to; false for an event of no known kind.
    static bool from_wire(const v1::Event& wire, Event* out);
    static Event error(const std::string& request_id, int32_t code, const std::string& status,
                       const std::string& message);
    static Event cancelled(const std::string& request_id);
};

}  // namespace npcd
