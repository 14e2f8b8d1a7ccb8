#include "event.h"

#include "npcd_client.h"

namespace npcd {

bool Event::terminal() const {
    return kind == NPCD_EVENT_FINISHED || kind == NPCD_EVENT_ERROR;
}

bool Event::from_wire(const v1::Event& wire, Event* out) {
    Event e;
    e.request_id = wire.request_id();
    switch (wire.kind_case()) {
        case v1::Event::kStarted:
            e.kind = NPCD_EVENT_STARTED;
            e.queue_position = wire.started().queue_position();
            break;
        case v1::Event::kDelta:
            e.kind = NPCD_EVENT_TEXT_DELTA;
            e.text = wire.delta().text();
            break;
        case v1::Event::kFinished: {
            const auto& f = wire.finished();
            e.kind = NPCD_EVENT_FINISHED;
            e.finish_reason = f.reason();
            e.text = f.text();
            e.prompt_tokens = f.prompt_tokens();
            e.completion_tokens = f.completion_tokens();
            e.queued_ms = f.timings().queued_ms();
            e.first_token_ms = f.timings().first_token_ms();
            e.total_ms = f.timings().total_ms();
            e.json = f.json();
            if (f.has_action()) {
                e.action_name = f.action().name();
                e.action_args_json = f.action().args_json();
            }
            if (f.has_emotion()) e.emotion = f.emotion().label();
            e.cached_prompt_tokens = f.cached_prompt_tokens();
            e.history_turns = f.history_turns();
            break;
        }
        case v1::Event::kSentence:
            e.kind = NPCD_EVENT_SENTENCE;
            e.sentence_index = wire.sentence().index();
            e.text = wire.sentence().text();
            break;
        case v1::Event::kAction:
            e.kind = NPCD_EVENT_ACTION;
            e.action_name = wire.action().name();
            e.action_args_json = wire.action().args_json();
            break;
        case v1::Event::kEmotion:
            e.kind = NPCD_EVENT_EMOTION;
            e.emotion = wire.emotion().label();
            break;
        case v1::Event::kError:
            e.kind = NPCD_EVENT_ERROR;
            e.error_code = wire.error().code();
            e.error_status = wire.error().status();
            e.text = wire.error().message();
            e.retry_after_ms = wire.error().retry_after_ms();
            break;
        case v1::Event::kDuplicate:
            e.kind = NPCD_EVENT_DUPLICATE;
            e.text = wire.duplicate().message();
            break;
        default:
            return false;
    }
    *out = std::move(e);
    return true;
}

Event Event::error(const std::string& request_id, int32_t code, const std::string& status,
                   const std::string& message) {
    Event e;
    e.kind = NPCD_EVENT_ERROR;
    e.request_id = request_id;
    e.error_code = code;
    e.error_status = status;
    e.text = message;
    return e;
}

Event Event::cancelled(const std::string& request_id) {
    Event e;
    e.kind = NPCD_EVENT_FINISHED;
    e.request_id = request_id;
    e.finish_reason = NPCD_FINISH_CANCELLED;
    return e;
}

}  // namespace npcd
