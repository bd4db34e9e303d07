// A client for `python -m mlx_worker`: requests, streamed events, cancel, shutdown.
//
//   auto worker = mlx_worker::Client::spawn({.python = "/path/to/python"});
//   worker->load("/models/tiny");
//   mlx_worker::GenerateParams p;
//   p.prompt = "Hello";
//   auto result = worker->generate(p, [](const mlx_worker::GenerateEvent& e) { ... });
//
// Every method may be called from any thread. Event callbacks run on the thread that reads
// the worker's stdout (the Client's reader thread, or the host's own with a custom
// Transport): keep them short, and never wait there for a response — a blocking call from
// a callback throws std::logic_error instead of deadlocking (cancel_async is fine).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <variant>

#include <nlohmann/json.hpp>

#include "mlx_worker/errors.hpp"
#include "mlx_worker/channels.hpp"
#include "mlx_worker/line_splitter.hpp"
#include "mlx_worker/process.hpp"
#include "mlx_worker/protocol.hpp"
#include "mlx_worker/transport.hpp"

namespace mlx_worker {

// A notification for a request: its method ("progress", "token", …) and params.
using EventHandler = std::function<void(const std::string& method, const nlohmann::json& params)>;
using GenerateEvent = std::variant<ProgressEvent, TokenEvent>;
using GenerateHandler = std::function<void(const GenerateEvent& event)>;

namespace detail {
struct CallState;
}

// One request in flight.
class Call {
 public:
  std::int64_t id() const { return id_; }
  // Waits for the response: its result, or throws RpcError / WorkerExited.
  nlohmann::json get() const;
  // True once the response (or the worker's exit) has arrived.
  bool wait_for(std::chrono::milliseconds timeout) const;

 private:
  friend class Client;
  std::int64_t id_ = 0;
  std::shared_ptr<detail::CallState> state_;
};

// A Call whose result converts to R.
template <class R>
class Pending {
 public:
  explicit Pending(Call call) : call_(std::move(call)) {}
  std::int64_t id() const { return call_.id(); }
  R get() const { return call_.get().template get<R>(); }
  bool wait_for(std::chrono::milliseconds timeout) const { return call_.wait_for(timeout); }
  const Call& call() const { return call_; }

 private:
  Call call_;
};

struct CloseOptions {
  std::chrono::milliseconds shutdown_timeout{2000};   // after `shutdown` and stdin EOF
  std::chrono::milliseconds terminate_timeout{2000};  // after SIGTERM, before SIGKILL
  std::chrono::milliseconds kill_timeout{5000};
};

class Client : public TransportSink {
 public:
  // Spawns the worker and waits for `ready`. Throws SpawnError (cannot start it),
  // WorkerExited (it ended before `ready`), ProtocolError (no `ready` in time, or a
  // protocol major version this client does not speak).
  static std::unique_ptr<Client> spawn(const SpawnOptions& options = {});

  // Drives a worker through a host-provided transport (see transport.hpp); starts it at
  // once. Call wait_ready() before sending.
  explicit Client(std::unique_ptr<Transport> transport, std::size_t stderr_tail_bytes = 8192,
                  std::function<void(std::string_view line)> line_observer = {});
  ~Client() override;  // close()
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Waits for `ready` and checks its protocol major version; throws as spawn() does.
  const ReadyEvent& wait_ready(std::chrono::milliseconds timeout);

  // Raw JSON-RPC. send() returns at once; request() waits. params must be an object.
  Call send(const std::string& method, const nlohmann::json& params = nlohmann::json::object(),
            EventHandler on_event = {});
  nlohmann::json request(const std::string& method, const nlohmann::json& params = nlohmann::json::object());

  // Typed, for every method in the schema: call(LoadParams{...}) -> LoadResult.
  template <class P>
  typename Method<P>::Result call(const P& params, EventHandler on_event = {}) {
    return call_async(params, std::move(on_event)).get();
  }
  template <class P>
  Pending<typename Method<P>::Result> call_async(const P& params, EventHandler on_event = {}) {
    return Pending<typename Method<P>::Result>(send(Method<P>::name, nlohmann::json(params), std::move(on_event)));
  }

  LoadResult load(const std::string& path, const std::optional<std::string>& model_id = std::nullopt);
  // Streams `progress` and `token` events to on_event, then returns the result.
  GenerateResult generate(const GenerateParams& params, GenerateHandler on_event = {});
  Pending<GenerateResult> generate_async(const GenerateParams& params, GenerateHandler on_event = {});
  // true: request `id`'s result will say stop_reason "cancelled"; false: unknown or finished.
  bool cancel(std::int64_t id);
  Pending<CancelResult> cancel_async(std::int64_t id);
  StatusResult status();
  // Vectors for EmbedParams::input (a string, strings or token ids) from an embedding model.
  EmbedResult embed(const EmbedParams& params);

  // Ends the worker: `shutdown` and stdin EOF, then SIGTERM, then SIGKILL, each after its
  // timeout. Returns how it exited. Pending calls fail with WorkerExited. Idempotent.
  ExitStatus close(const CloseOptions& options = {});
  // Closes the worker's stdin (it exits 0 on EOF).
  void close_input();
  // The exit status once the worker has exited (waiting up to timeout), else nullopt.
  std::optional<ExitStatus> wait_exit(std::chrono::milliseconds timeout);
  std::optional<long> pid() const { return transport_->pid(); }
  // The last bytes of the worker's stderr.
  std::string stderr_tail() const;

  // TransportSink: what the transport feeds in.
  void on_stdout(const char* data, std::size_t size) override;
  void on_stderr(const char* data, std::size_t size) override;
  void on_exit(const ExitStatus& status) override;

 private:
  void handle_line(std::string_view line);
  WorkerExited exited_error() const;  // requires mutex_

  std::unique_ptr<Transport> transport_;
  LineSplitter splitter_;
  std::function<void(std::string_view)> line_observer_;

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::map<std::int64_t, std::shared_ptr<detail::CallState>> pending_;
  std::int64_t next_id_ = 1;
  std::optional<ReadyEvent> ready_;
  std::optional<ExitStatus> exit_status_;
  std::string stderr_tail_;
  std::size_t stderr_tail_bytes_;

  std::mutex write_mutex_;  // one line at a time on stdin
  bool input_closed_ = false;
};

// True when `version` ("1.0", "1.3") has this client's protocol major version.
bool protocol_compatible(const std::string& version);

}  // namespace mlx_worker
