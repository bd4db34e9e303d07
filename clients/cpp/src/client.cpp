#include "mlx_worker/client.hpp"

#include <condition_variable>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <utility>
#include <vector>

namespace mlx_worker {

// ---- errors -----------------------------------------------------------------

RpcError::RpcError(int code, std::string message, nlohmann::json data)
    : Error("worker error " + std::to_string(code) + ": " + message),
      code_(code),
      message_(std::move(message)),
      data_(std::move(data)) {}

std::string RpcError::field() const {
  if (data_.is_object()) {
    auto it = data_.find("field");
    if (it != data_.end() && it->is_string()) return it->get<std::string>();
  }
  return {};
}

std::string ExitStatus::describe() const {
  if (exit_code) return "exit code " + std::to_string(*exit_code);
  if (signal) return "signal " + std::to_string(*signal);
  return "unknown status";
}

WorkerExited::WorkerExited(ExitStatus status, std::string stderr_tail)
    : Error("the worker exited (" + status.describe() + ")" +
            (stderr_tail.empty() ? std::string() : "; stderr ends with:\n" + stderr_tail)),
      status_(status),
      stderr_tail_(std::move(stderr_tail)) {}

bool protocol_compatible(const std::string& version) {
  auto major = [](const std::string& v) { return v.substr(0, v.find('.')); };
  return !version.empty() && major(version) == major(kProtocolVersion);
}

// ---- calls ------------------------------------------------------------------

namespace detail {

// Set while this thread delivers worker output: waiting for a response there would
// wait for this very thread.
thread_local bool dispatching = false;

// A call's outcome is kept as data and each waiter throws its own exception object:
// no exception object is shared between threads.
struct CallState {
  EventHandler on_event;             // used by the reader thread only
  std::exception_ptr handler_error;  // reader thread only, until done
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  nlohmann::json result;
  std::optional<RpcError> rpc_error;
  std::optional<WorkerExited> exited;

  void finish(nlohmann::json value, std::optional<RpcError> error, std::optional<WorkerExited> gone) {
    std::lock_guard<std::mutex> lock(mutex);
    if (done) return;
    result = std::move(value);
    rpc_error = std::move(error);
    exited = std::move(gone);
    done = true;
    cv.notify_all();
  }
};

}  // namespace detail

nlohmann::json Call::get() const {
  std::unique_lock<std::mutex> lock(state_->mutex);
  if (!state_->done && detail::dispatching) {
    throw std::logic_error("mlx_worker: waiting for a response inside an event callback would deadlock");
  }
  state_->cv.wait(lock, [this] { return state_->done; });
  if (state_->handler_error) std::rethrow_exception(state_->handler_error);
  if (state_->rpc_error) throw RpcError(*state_->rpc_error);
  if (state_->exited) throw WorkerExited(*state_->exited);
  return state_->result;
}

bool Call::wait_for(std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(state_->mutex);
  return state_->cv.wait_for(lock, timeout, [this] { return state_->done; });
}

// ---- client -----------------------------------------------------------------

std::unique_ptr<Client> Client::spawn(const SpawnOptions& options) {
  auto client = std::make_unique<Client>(std::make_unique<ProcessTransport>(options), options.stderr_tail_bytes,
                                         options.line_observer);
  try {
    client->wait_ready(options.ready_timeout);
  } catch (...) {
    client->close(CloseOptions{std::chrono::milliseconds(500), std::chrono::milliseconds(500)});
    throw;
  }
  return client;
}

Client::Client(std::unique_ptr<Transport> transport, std::size_t stderr_tail_bytes,
               std::function<void(std::string_view)> line_observer)
    : transport_(std::move(transport)),
      line_observer_(std::move(line_observer)),
      stderr_tail_bytes_(stderr_tail_bytes) {
  transport_->start(this);
}

Client::~Client() {
  close();
  transport_.reset();  // joins its threads while this sink still exists
}

const ReadyEvent& Client::wait_ready(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!cv_.wait_for(lock, timeout, [this] { return ready_ || exit_status_; })) {
    throw ProtocolError("the worker sent no `ready` within " + std::to_string(timeout.count()) + " ms");
  }
  if (!ready_) throw exited_error();
  if (!protocol_compatible(ready_->protocol_version)) {
    throw ProtocolError("the worker speaks protocol " + ready_->protocol_version + "; this client speaks " +
                        kProtocolVersion);
  }
  return *ready_;
}

WorkerExited Client::exited_error() const {
  return WorkerExited(exit_status_.value_or(ExitStatus{}), stderr_tail_);
}

Call Client::send(const std::string& method, const nlohmann::json& params, EventHandler on_event) {
  Call call;
  call.state_ = std::make_shared<detail::CallState>();
  call.state_->on_event = std::move(on_event);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (exit_status_) throw exited_error();
    call.id_ = next_id_++;
  }
  nlohmann::json message = {{"jsonrpc", "2.0"}, {"id", call.id_}, {"method", method}, {"params", params}};
  std::string line = message.dump();  // throws nlohmann::json::type_error on invalid UTF-8
  line.push_back('\n');
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (exit_status_) throw exited_error();
    pending_.emplace(call.id_, call.state_);
  }
  std::lock_guard<std::mutex> write_lock(write_mutex_);
  // A failed write means the worker is gone or going: its exit fails this call.
  if (!input_closed_) transport_->write_line(line);
  return call;
}

nlohmann::json Client::request(const std::string& method, const nlohmann::json& params) {
  return send(method, params).get();
}

LoadResult Client::load(const std::string& path, const std::optional<std::string>& model_id) {
  LoadParams params;
  params.model = path;
  params.model_id = model_id;
  return call(params);
}

namespace {

EventHandler generate_events(GenerateHandler on_event) {
  if (!on_event) return {};
  return [on_event = std::move(on_event)](const std::string& method, const nlohmann::json& params) {
    if (method == notification::progress) {
      on_event(GenerateEvent(params.get<ProgressEvent>()));
    } else if (method == notification::token) {
      on_event(GenerateEvent(params.get<TokenEvent>()));
    }
  };
}

}  // namespace

GenerateResult Client::generate(const GenerateParams& params, GenerateHandler on_event) {
  return generate_async(params, std::move(on_event)).get();
}

Pending<GenerateResult> Client::generate_async(const GenerateParams& params, GenerateHandler on_event) {
  return call_async(params, generate_events(std::move(on_event)));
}

bool Client::cancel(std::int64_t id) { return cancel_async(id).get().cancelled; }

Pending<CancelResult> Client::cancel_async(std::int64_t id) {
  CancelParams params;
  params.id = id;
  return call_async(params);
}

StatusResult Client::status() { return call(StatusParams{}); }

EmbedResult Client::embed(const EmbedParams& params) { return call(params); }

void Client::close_input() {
  std::lock_guard<std::mutex> write_lock(write_mutex_);
  if (!input_closed_) transport_->close_input();
  input_closed_ = true;
}

std::optional<ExitStatus> Client::wait_exit(std::chrono::milliseconds timeout) {
  if (!transport_->wait_exit(timeout)) return std::nullopt;
  std::lock_guard<std::mutex> lock(mutex_);
  return exit_status_;
}

ExitStatus Client::close(const CloseOptions& options) {
  bool running;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    running = !exit_status_.has_value();
  }
  if (running) {
    try {
      send("shutdown");  // answered, then the worker exits 0; not waited for here
    } catch (const Error&) {
    }
    close_input();
    if (!transport_->wait_exit(options.shutdown_timeout)) {
      transport_->terminate();
      if (!transport_->wait_exit(options.terminate_timeout)) {
        transport_->kill();
        transport_->wait_exit(options.kill_timeout);
      }
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return exit_status_.value_or(ExitStatus{});
}

std::string Client::stderr_tail() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stderr_tail_;
}

void Client::on_stdout(const char* data, std::size_t size) {
  detail::dispatching = true;
  splitter_.feed(data, size, [this](std::string_view line) { handle_line(line); });
  detail::dispatching = false;
}

void Client::on_stderr(const char* data, std::size_t size) {
  std::lock_guard<std::mutex> lock(mutex_);
  stderr_tail_.append(data, size);
  if (stderr_tail_.size() > stderr_tail_bytes_) {
    stderr_tail_.erase(0, stderr_tail_.size() - stderr_tail_bytes_);
  }
}

void Client::handle_line(std::string_view line) {
  if (line_observer_) line_observer_(line);
  nlohmann::json message = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!message.is_object()) return;  // not protocol: nothing can be routed from it

  auto method = message.find("method");
  if (method != message.end() && method->is_string()) {
    auto params_it = message.find("params");
    const nlohmann::json params = params_it != message.end() ? *params_it : nlohmann::json::object();
    const std::string& name = method->get_ref<const std::string&>();
    if (name == notification::ready) {
      std::lock_guard<std::mutex> lock(mutex_);
      try {
        ready_ = params.get<ReadyEvent>();
      } catch (const nlohmann::json::exception&) {
        ready_ = ReadyEvent{};  // unreadable: wait_ready reports the version mismatch
      }
      cv_.notify_all();
      return;
    }
    if (!params.is_object() || !params.contains("id") || !params["id"].is_number_integer()) return;
    std::shared_ptr<detail::CallState> state;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = pending_.find(params["id"].get<std::int64_t>());
      if (it == pending_.end()) return;
      state = it->second;
    }
    if (state->on_event && !state->handler_error) {
      try {
        state->on_event(name, params);
      } catch (...) {
        // The host can't take this request's events any more: stop the work it asked for;
        // its caller gets this exception from get() (the cancelled result is dropped).
        state->handler_error = std::current_exception();
        try {
          send("cancel", {{"id", params["id"]}});  // not waited for: this is the reader thread
        } catch (const Error&) {
          // the worker is gone: the call fails (with the handler's error) anyway
        }
      }
    }
    return;
  }

  auto id = message.find("id");
  if (id == message.end() || !id->is_number_integer()) return;  // e.g. id null: not ours to route
  std::shared_ptr<detail::CallState> state;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = pending_.find(id->get<std::int64_t>());
    if (it == pending_.end()) return;
    state = std::move(it->second);
    pending_.erase(it);
  }
  if (auto error = message.find("error"); error != message.end() && error->is_object()) {
    int code = error->value("code", 0);
    std::string text = error->value("message", std::string());
    nlohmann::json data = error->contains("data") ? (*error)["data"] : nlohmann::json();
    state->finish({}, RpcError(code, std::move(text), std::move(data)), std::nullopt);
  } else {
    auto result = message.find("result");
    state->finish(result != message.end() ? *result : nlohmann::json(), std::nullopt, std::nullopt);
  }
}

void Client::on_exit(const ExitStatus& status) {
  std::map<std::int64_t, std::shared_ptr<detail::CallState>> orphans;
  std::optional<WorkerExited> error;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    exit_status_ = status;
    orphans.swap(pending_);
    error = exited_error();
    cv_.notify_all();
  }
  for (auto& [id, state] : orphans) state->finish({}, std::nullopt, error);
}

}  // namespace mlx_worker
