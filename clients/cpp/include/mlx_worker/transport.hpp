// The seam between the protocol (Client) and the process that carries it.
//
// ProcessTransport (process.hpp) spawns the worker with POSIX pipes and threads. A host
// with its own event loop implements Transport instead, e.g. over Qt's QProcess:
//
//   write_line      -> process.write(line.data(), line.size())
//   close_input     -> process.closeWriteChannel()
//   terminate/kill  -> process.terminate() / process.kill()
//   wait_exit       -> process.waitForFinished(ms)
//
// and feeds what the process produces into the Client (a TransportSink):
//
//   readyReadStandardOutput -> client.on_stdout(bytes.constData(), bytes.size())
//   readyReadStandardError  -> client.on_stderr(...)
//   finished(code, status)  -> client.on_exit(ExitStatus{...})
#pragma once

#include <chrono>
#include <cstddef>
#include <optional>
#include <string_view>

#include "mlx_worker/errors.hpp"

namespace mlx_worker {

// What a transport reports. Calls may come from any one thread at a time per stream;
// on_exit comes once, after the last on_stdout.
class TransportSink {
 public:
  virtual ~TransportSink() = default;
  virtual void on_stdout(const char* data, std::size_t size) = 0;
  virtual void on_stderr(const char* data, std::size_t size) = 0;
  virtual void on_exit(const ExitStatus& status) = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  // Starts delivering output to sink (called once by the Client).
  virtual void start(TransportSink* sink) = 0;
  // Writes one line (ending in '\n') to the worker's stdin. Returns false when the worker's
  // stdin is closed (it died); never raises SIGPIPE. Called under the Client's write lock.
  virtual bool write_line(std::string_view line) = 0;
  // Closes the worker's stdin (the worker exits on EOF).
  virtual void close_input() = 0;
  virtual void terminate() = 0;  // SIGTERM
  virtual void kill() = 0;       // SIGKILL
  // Waits until on_exit has been delivered; returns false on timeout.
  virtual bool wait_exit(std::chrono::milliseconds timeout) = 0;
  // The worker's process id, if known.
  virtual std::optional<long> pid() const = 0;
};

}  // namespace mlx_worker
