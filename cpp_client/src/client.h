// The client behind the C ABI's opaque npcd_client: client.cpp (frames, polling) and personas.cpp use it.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "event.h"
#include "npcd/v1/npcd.pb.h"
#include "session.h"

struct npcd_client {
    std::unique_ptr<npcd::Session> session;
    uint64_t ticks_sent = 0;
    npcd::v1::Tick pending;  // this frame's requests and cancels
    std::vector<npcd::Event> delivered;  // backs the strings of the last poll
};
