// The connection to the daemon: one Session stream at a time, reopened with
// exponential backoff when it ends. Owns the requests in flight: each gets
// exactly one terminal event, from the daemon or, when the stream is lost,
// an UNAVAILABLE error made here. Events wait in an inbox until taken.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "event.h"
#include "npcd/v1/npcd.grpc.pb.h"

namespace npcd {

class Session {
public:
    Session(const std::string& address, std::chrono::milliseconds initial_backoff,
            std::chrono::milliseconds max_backoff);
    ~Session();
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

    // Sends a tick when connected; otherwise its requests fail at once.
    // Cancels of requests not in flight are dropped.
    void send(v1::Tick tick);
    // Queues an event made by the caller (e.g. a local cancel).
    void post(Event event);
    // Moves up to `max` events, oldest first, into `out`.
    void take(std::vector<Event>* out, size_t max);
    bool in_flight(const std::string& request_id) const;
    int32_t state() const;

private:
    void run();
    // One stream, from connecting to its end; true when it was healthy (a
    // stream the daemon ends at once makes the next attempt wait, doubling).
    bool run_stream();
    void deliver(const v1::Event& wire);
    void fail_in_flight(const std::string& why);  // holds mu_
    bool sleep_for(std::chrono::milliseconds delay);  // false when stopping

    const std::chrono::milliseconds initial_backoff_;
    const std::chrono::milliseconds max_backoff_;
    std::shared_ptr<grpc::Channel> channel_;
    std::unique_ptr<v1::Npcd::Stub> stub_;

    mutable std::mutex mu_;
    std::condition_variable cv_;
    bool stopping_ = false;
    bool read_done_ = false;
    int32_t state_;
    grpc::ClientContext* context_ = nullptr;  // of the open stream
    std::deque<v1::Tick> outbox_;
    std::unordered_set<std::string> in_flight_;
    std::deque<Event> inbox_;
    std::thread thread_;
};

}  // namespace npcd
