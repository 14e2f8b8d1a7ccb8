// The client behind the C ABI's opaque npcd_client: client.cpp (frames, polling), personas.cpp and
// conversations.cpp (the blocking unary calls) use it.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "event.h"
#include "npcd/v1/npcd.pb.h"
#include "npcd_client.h"
#include "session.h"

struct npcd_client {
    std::unique_ptr<npcd::Session> session;
    uint64_t ticks_sent = 0;
    npcd::v1::Tick pending;  // this frame's requests and cancels
    std::vector<npcd::Event> delivered;  // backs the strings of the last poll
};

namespace npcd {

// A blocking call's wait: timeout_ms, or 5000 for 0 (the header's promise for every such call).
inline std::chrono::milliseconds call_timeout(uint32_t timeout_ms) {
    return std::chrono::milliseconds(timeout_ms ? timeout_ms : 5000);
}

// The C ABI's answer to a unary call's status: NPCD_OK (clearing npcd_last_error), or NPCD_ERR_RPC with the
// gRPC code in *rpc_code_out (when not NULL) and npcd_last_error() naming the call and the daemon's message.
npcd_status rpc_outcome(const grpc::Status& status, const char* call, int32_t* rpc_code_out);

}  // namespace npcd
