#include "session.h"

#include <algorithm>
#include <iterator>
#include <utility>

#include <google/protobuf/io/coded_stream.h>

#include "npcd_client.h"

namespace npcd {

namespace {

constexpr int32_t kUnavailable = 14;
constexpr int32_t kResourceExhausted = 8;
// A stream that lived this long counts as healthy even if nothing came back.
constexpr std::chrono::seconds kHealthyStream{1};

std::shared_ptr<grpc::Channel> make_channel(const SessionOptions& options,
                                            std::chrono::milliseconds initial,
                                            std::chrono::milliseconds max) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, static_cast<int>(initial.count()));
    args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, static_cast<int>(initial.count()));
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, static_cast<int>(max.count()));
    std::shared_ptr<grpc::ChannelCredentials> credentials;
    if (options.tls) {
        grpc::SslCredentialsOptions ssl;
        ssl.pem_root_certs = options.root_certs_pem;  // "": the system's roots
        ssl.pem_cert_chain = options.client_cert_pem;
        ssl.pem_private_key = options.client_key_pem;
        credentials = grpc::SslCredentials(ssl);
        if (!options.tls_server_name.empty()) args.SetSslTargetNameOverride(options.tls_server_name);
    } else {
        credentials = grpc::InsecureChannelCredentials();
    }
    return grpc::CreateCustomChannel(options.address, credentials, args);
}

const char* status_name(grpc::StatusCode code) {
    static const char* const kNames[] = {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED"};
    const int i = static_cast<int>(code);
    return i >= 0 && i <= 16 ? kNames[i] : "UNKNOWN";
}

// What one repeated field element adds to a Tick: its tag, its length, itself.
size_t element_bytes(size_t size) {
    return 1 + google::protobuf::io::CodedOutputStream::VarintSize64(size) + size;
}

}  // namespace

std::vector<v1::Tick> split_tick(v1::Tick tick) {
    std::vector<v1::Tick> out;
    if (tick.requests_size() == 0 && tick.cancels_size() == 0) return out;
    if (tick.ByteSizeLong() <= NPCD_MAX_REQUEST_BYTES) {
        out.push_back(std::move(tick));
        return out;
    }
    size_t used = 0;
    auto room_for = [&](size_t bytes) -> v1::Tick& {
        if (out.empty() || (used > 0 && used + bytes > NPCD_MAX_REQUEST_BYTES)) {
            out.emplace_back();
            out.back().set_tick(tick.tick());
            used = 0;
        }
        used += bytes;
        return out.back();
    };
    for (auto& cancel : *tick.mutable_cancels())
        *room_for(element_bytes(cancel.ByteSizeLong())).add_cancels() = std::move(cancel);
    for (auto& request : *tick.mutable_requests())
        *room_for(element_bytes(request.ByteSizeLong())).add_requests() = std::move(request);
    return out;
}

Session::Session(SessionOptions options)
    : options_(std::move(options)),
      initial_backoff_(options_.initial_backoff),
      max_backoff_(std::max(options_.initial_backoff, options_.max_backoff)),
      channel_(make_channel(options_, initial_backoff_, max_backoff_)),
      stub_(v1::Npcd::NewStub(channel_)),
      state_(NPCD_CONNECTING) {
    thread_ = std::thread([this] { run(); });
}

Session::~Session() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stopping_ = true;
        if (context_ != nullptr) context_->TryCancel();
    }
    cv_.notify_all();
    thread_.join();
}

void Session::send(v1::Tick tick) {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ != NPCD_CONNECTED && !ever_connected_) {
        // CONNECTING: the requests wait for the first connection
        for (const auto& cancel : tick.cancels()) {
            auto it = std::find_if(connect_queue_.begin(), connect_queue_.end(), [&](const Queued& q) {
                return q.request.request_id() == cancel.request_id();
            });
            if (it == connect_queue_.end()) continue;
            connect_queue_.erase(it);
            in_flight_.erase(cancel.request_id());
            inbox_.push_back(Event::cancelled(cancel.request_id()));
        }
        const auto expires = std::chrono::steady_clock::now() + options_.connect_queue_timeout;
        for (auto& request : *tick.mutable_requests()) {
            if (connect_queue_.size() >= options_.connect_queue_max) {
                inbox_.push_back(Event::error(
                    request.request_id(), kResourceExhausted, "RESOURCE_EXHAUSTED",
                    "not connected to npcd yet, and " + std::to_string(connect_queue_.size()) +
                        " requests already wait for the connection (connect_queue_max)"));
                continue;
            }
            in_flight_.insert(request.request_id());
            connect_queue_.push_back(Queued{std::move(request), expires});
        }
        return;
    }
    if (state_ != NPCD_CONNECTED) {
        for (const auto& request : tick.requests()) {
            if (refusal_code_ != 0)
                inbox_.push_back(Event::error(request.request_id(), refusal_code_, refusal_status_, refusal_message_));
            else
                inbox_.push_back(Event::error(request.request_id(), kUnavailable, "UNAVAILABLE",
                                              "not connected to npcd (the connection was lost; reconnecting)"));
        }
        return;
    }
    auto* cancels = tick.mutable_cancels();
    cancels->erase(std::remove_if(cancels->begin(), cancels->end(),
                                  [this](const v1::Cancel& c) {
                                      return in_flight_.count(c.request_id()) == 0;
                                  }),
                   cancels->end());
    for (const auto& request : tick.requests()) in_flight_.insert(request.request_id());
    // all parts at once, under the lock: the writer sends them in order, one after another
    for (auto& part : split_tick(std::move(tick))) outbox_.push_back(std::move(part));
    cv_.notify_all();
}

void Session::post(Event event) {
    std::lock_guard<std::mutex> lock(mu_);
    inbox_.push_back(std::move(event));
}

void Session::take(std::vector<Event>* out, size_t max) {
    std::lock_guard<std::mutex> lock(mu_);
    while (max-- > 0 && !inbox_.empty()) {
        out->push_back(std::move(inbox_.front()));
        inbox_.pop_front();
    }
}

bool Session::in_flight(const std::string& request_id) const {
    std::lock_guard<std::mutex> lock(mu_);
    return in_flight_.count(request_id) != 0;
}

int32_t Session::state() const {
    std::lock_guard<std::mutex> lock(mu_);
    return state_;
}

void Session::run() {
    auto delay = initial_backoff_;
    for (;;) {
        const bool healthy = run_stream();
        {
            std::lock_guard<std::mutex> lock(mu_);
            if (stopping_) return;
            state_ = ever_connected_ ? NPCD_DISCONNECTED : NPCD_CONNECTING;
        }
        delay = healthy ? initial_backoff_ : std::min(delay * 2, max_backoff_);
        if (!healthy && !sleep_for(delay)) return;
    }
}

bool Session::run_stream() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        state_ = ever_connected_ ? NPCD_DISCONNECTED : NPCD_CONNECTING;
    }
    // The channel retries the connection with its own exponential backoff,
    // configured like ours; wait in short slices so that shutdown is prompt
    // and queued requests time out on time.
    while (!channel_->WaitForConnected(std::chrono::system_clock::now() +
                                       std::chrono::milliseconds(50))) {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_) return false;
        expire_queued();
    }

    grpc::ClientContext context;
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_) return false;
        context_ = &context;
        read_done_ = false;
    }
    open_context(&context);
    const auto opened = std::chrono::steady_clock::now();
    auto stream = stub_->Session(&context);
    {
        std::lock_guard<std::mutex> lock(mu_);
        state_ = NPCD_CONNECTED;
        ever_connected_ = true;
        if (!connect_queue_.empty()) {  // they go out first, as one Tick (or several: split_tick)
            v1::Tick tick;
            for (auto& q : connect_queue_) *tick.add_requests() = std::move(q.request);
            connect_queue_.clear();
            auto parts = split_tick(std::move(tick));
            outbox_.insert(outbox_.begin(), std::make_move_iterator(parts.begin()),
                           std::make_move_iterator(parts.end()));
        }
    }

    bool received = false;
    std::thread reader([&] {
        v1::Event wire;
        while (stream->Read(&wire)) {
            received = true;
            deliver(wire);
        }
        std::lock_guard<std::mutex> lock(mu_);
        read_done_ = true;
        cv_.notify_all();
    });

    bool write_failed = false;
    for (;;) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || read_done_ || !outbox_.empty(); });
        if (stopping_ || read_done_) break;
        v1::Tick tick = std::move(outbox_.front());
        outbox_.pop_front();
        lock.unlock();
        if (!stream->Write(tick)) {
            write_failed = true;  // the call is over (the daemon ended it, or the connection went)
            break;
        }
    }
    bool read_ended;
    {
        std::lock_guard<std::mutex> lock(mu_);
        read_ended = read_done_;
    }
    // Cancel only to unblock a reader we are abandoning (stop). After a failed Write the call is already over
    // and the reader ends by itself: cancelling then would replace the daemon's status (UNAUTHENTICATED, say)
    // with CANCELLED, a race that made the wrong-token case read as a lost connection.
    if (!read_ended && !write_failed) context.TryCancel();
    reader.join();
    const grpc::Status status = stream->Finish();

    std::lock_guard<std::mutex> lock(mu_);
    context_ = nullptr;
    outbox_.clear();
    if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED ||
        status.error_code() == grpc::StatusCode::PERMISSION_DENIED) {
        // not a lost connection: say so with the daemon's own code
        refusal_code_ = static_cast<int32_t>(status.error_code());
        refusal_status_ = status_name(status.error_code());
        refusal_message_ = "the daemon refused the session: " + status.error_message();
        fail_in_flight(refusal_code_, refusal_status_, refusal_message_);
    } else {
        refusal_code_ = 0;
        fail_in_flight(kUnavailable, "UNAVAILABLE",
                       "connection to npcd lost: " + (status.ok() ? std::string("the daemon closed the session")
                                                                  : status.error_message()));
    }
    return received || std::chrono::steady_clock::now() - opened >= kHealthyStream;
}

void Session::deliver(const v1::Event& wire) {
    Event event;
    if (!Event::from_wire(wire, &event)) return;
    std::lock_guard<std::mutex> lock(mu_);
    // Nothing may follow a request's terminal event, nor reach unknown ids.
    auto it = in_flight_.find(event.request_id);
    if (it == in_flight_.end()) return;
    if (event.terminal()) in_flight_.erase(it);
    inbox_.push_back(std::move(event));
}

void Session::fail_in_flight(int32_t code, const std::string& status, const std::string& why) {
    for (const auto& id : in_flight_) inbox_.push_back(Event::error(id, code, status, why));
    in_flight_.clear();
}

void Session::expire_queued() {
    const auto now = std::chrono::steady_clock::now();
    while (!connect_queue_.empty() && connect_queue_.front().expires <= now) {
        const std::string id = connect_queue_.front().request.request_id();
        connect_queue_.pop_front();
        in_flight_.erase(id);
        inbox_.push_back(Event::error(
            id, kUnavailable, "UNAVAILABLE",
            "not connected to npcd at " + options_.address + " within " +
                std::to_string(options_.connect_queue_timeout.count()) +
                " ms (connect_queue_timeout_ms); the request was not sent"));
    }
}

void Session::open_context(grpc::ClientContext* context) const {
    if (!options_.token.empty()) context->AddMetadata("authorization", "Bearer " + options_.token);
}

bool Session::sleep_for(std::chrono::milliseconds delay) {
    std::unique_lock<std::mutex> lock(mu_);
    return !cv_.wait_for(lock, delay, [this] { return stopping_; });
}

}  // namespace npcd
