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

// How to connect: npcd_client_options, checked and copied.
struct SessionOptions {
    std::string address;
    std::chrono::milliseconds initial_backoff{250};
    std::chrono::milliseconds max_backoff{5000};
    size_t connect_queue_max = 64;
    std::chrono::milliseconds connect_queue_timeout{10000};
    std::string token;  // "": none
    bool tls = false;
    std::string root_certs_pem;
    std::string client_cert_pem;
    std::string client_key_pem;
    std::string tls_server_name;
};

// The tick's cancels, then its requests, in order, cut into Ticks of at most
// NPCD_MAX_REQUEST_BYTES each (the daemon handles a Tick's cancels before its
// requests, so the order of effects stays). Each carries the tick's number.
// One Tick when it fits; none when it is empty.
std::vector<v1::Tick> split_tick(v1::Tick tick);

class Session {
public:
    explicit Session(SessionOptions options);
    ~Session();
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

    // Sends a tick when connected (as several, in order, when it is over
    // NPCD_MAX_REQUEST_BYTES: split_tick). While CONNECTING (never connected yet) its
    // requests wait in the connect queue (bounded, each with a timeout); while
    // DISCONNECTED they fail at once. Cancels of requests not in flight are
    // dropped; a cancel of a queued request ends it FINISHED/CANCELLED.
    void send(v1::Tick tick);
    // Queues an event made by the caller (e.g. a local cancel).
    void post(Event event);
    // Moves up to `max` events, oldest first, into `out`.
    void take(std::vector<Event>* out, size_t max);
    bool in_flight(const std::string& request_id) const;
    // A unary call (ListPersonas, ExportConversations ...) on the session's channel, with its token; waits at
    // most `timeout` (for the channel too). Lines in flight are not affected.
    template <class Request, class Response>
    grpc::Status call(grpc::Status (v1::Npcd::Stub::*method)(grpc::ClientContext*, const Request&, Response*),
                      const Request& request, std::chrono::milliseconds timeout, Response* out) const {
        grpc::ClientContext context;
        open_context(&context);
        context.set_deadline(std::chrono::system_clock::now() + timeout);
        return (stub_.get()->*method)(&context, request, out);
    }
    int32_t state() const;

private:
    void run();
    // One stream, from connecting to its end; true when it was healthy (a
    // stream the daemon ends at once makes the next attempt wait, doubling).
    bool run_stream();
    void deliver(const v1::Event& wire);
    // holds mu_: every in-flight request ends with this error
    void fail_in_flight(int32_t code, const std::string& status, const std::string& why);
    void expire_queued();  // holds mu_: queued requests past their timeout fail
    void open_context(grpc::ClientContext* context) const;
    bool sleep_for(std::chrono::milliseconds delay);  // false when stopping

    struct Queued {
        v1::SayRequest request;
        std::chrono::steady_clock::time_point expires;
    };

    const SessionOptions options_;
    const std::chrono::milliseconds initial_backoff_;
    const std::chrono::milliseconds max_backoff_;
    std::shared_ptr<grpc::Channel> channel_;
    std::unique_ptr<v1::Npcd::Stub> stub_;

    mutable std::mutex mu_;
    std::condition_variable cv_;
    bool stopping_ = false;
    bool read_done_ = false;
    int32_t state_;
    bool ever_connected_ = false;
    // The daemon's refusal of the last stream (UNAUTHENTICATED / PERMISSION_DENIED), code 0 when it
    // was not refused: while DISCONNECTED after one, requests fail with it instead of UNAVAILABLE.
    int32_t refusal_code_ = 0;
    std::string refusal_status_, refusal_message_;
    std::deque<Queued> connect_queue_;  // requests waiting for the first connection (also in in_flight_)
    grpc::ClientContext* context_ = nullptr;  // of the open stream
    std::deque<v1::Tick> outbox_;
    std::unordered_set<std::string> in_flight_;
    std::deque<Event> inbox_;
    std::thread thread_;
};

}  // namespace npcd
