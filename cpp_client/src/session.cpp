#include "session.h"

#include <algorithm>
#include <utility>

#include "npcd_client.h"

namespace npcd {

namespace {

constexpr int32_t kUnavailable = 14;
// A stream that lived this long counts as healthy even if nothing came back.
constexpr std::chrono::seconds kHealthyStream{1};

std::shared_ptr<grpc::Channel> make_channel(const std::string& address,
                                            std::chrono::milliseconds initial,
                                            std::chrono::milliseconds max) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, static_cast<int>(initial.count()));
    args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, static_cast<int>(initial.count()));
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, static_cast<int>(max.count()));
    return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

}  // namespace

Session::Session(const std::string& address, std::chrono::milliseconds initial_backoff,
                 std::chrono::milliseconds max_backoff)
    : initial_backoff_(initial_backoff),
      max_backoff_(std::max(initial_backoff, max_backoff)),
      channel_(make_channel(address, initial_backoff_, max_backoff_)),
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
    if (state_ != NPCD_CONNECTED) {
        for (const auto& request : tick.requests()) {
            inbox_.push_back(Event::error(request.request_id(), kUnavailable, "UNAVAILABLE",
                                          "not connected to npcd"));
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
    if (tick.requests_size() == 0 && tick.cancels_size() == 0) return;
    outbox_.push_back(std::move(tick));
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
            state_ = NPCD_DISCONNECTED;
        }
        delay = healthy ? initial_backoff_ : std::min(delay * 2, max_backoff_);
        if (!healthy && !sleep_for(delay)) return;
    }
}

bool Session::run_stream() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        state_ = NPCD_CONNECTING;
    }
    // The channel retries the connection with its own exponential backoff,
    // configured like ours; wait in short slices so that shutdown is prompt.
    while (!channel_->WaitForConnected(std::chrono::system_clock::now() +
                                       std::chrono::milliseconds(100))) {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_) return false;
    }

    grpc::ClientContext context;
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_) return false;
        context_ = &context;
        read_done_ = false;
    }
    const auto opened = std::chrono::steady_clock::now();
    auto stream = stub_->Session(&context);
    {
        std::lock_guard<std::mutex> lock(mu_);
        state_ = NPCD_CONNECTED;
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

    for (;;) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || read_done_ || !outbox_.empty(); });
        if (stopping_ || read_done_) break;
        v1::Tick tick = std::move(outbox_.front());
        outbox_.pop_front();
        lock.unlock();
        if (!stream->Write(tick)) break;
    }
    bool read_ended;
    {
        std::lock_guard<std::mutex> lock(mu_);
        read_ended = read_done_;
    }
    if (!read_ended) context.TryCancel();  // unblocks the reader; keeps a real end status
    reader.join();
    const grpc::Status status = stream->Finish();

    std::lock_guard<std::mutex> lock(mu_);
    context_ = nullptr;
    outbox_.clear();
    fail_in_flight(status.ok() ? std::string("the daemon closed the session")
                               : status.error_message());
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

void Session::fail_in_flight(const std::string& why) {
    for (const auto& id : in_flight_) {
        inbox_.push_back(
            Event::error(id, kUnavailable, "UNAVAILABLE", "connection to npcd lost: " + why));
    }
    in_flight_.clear();
}

bool Session::sleep_for(std::chrono::milliseconds delay) {
    std::unique_lock<std::mutex> lock(mu_);
    return !cv_.wait_for(lock, delay, [this] { return stopping_; });
}

}  // namespace npcd
