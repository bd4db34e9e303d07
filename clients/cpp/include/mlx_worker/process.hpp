// Spawning the worker: POSIX spawn, close-on-exec pipes, reader threads, reaping.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "mlx_worker/transport.hpp"

namespace mlx_worker {

struct SpawnOptions {
  // The interpreter; a bare name is looked up on PATH.
  std::string python = "python3";
  // Arguments after the interpreter.
  std::vector<std::string> args = {"-m", "mlx_worker"};
  // Variables set on top of this process's environment (or instead of it, see inherit_env).
  std::map<std::string, std::string> env;
  bool inherit_env = true;
  // Working directory of the worker ("" = this process's).
  std::string cwd;
  // How long spawn() waits for `ready`.
  std::chrono::milliseconds ready_timeout{60000};
  // Bytes of the worker's stderr kept for error messages.
  std::size_t stderr_tail_bytes = 8192;
  // Called with every stdout line as received, `ready` included (for logs and tests).
  std::function<void(std::string_view line)> line_observer;
};

// A child process with its three standard streams on pipes. Not copyable.
class Subprocess {
 public:
  // Throws SpawnError when the program cannot be started.
  Subprocess(const std::string& program, const std::vector<std::string>& args,
             const std::vector<std::string>& environment, const std::string& cwd);
  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  long pid() const { return pid_; }
  int stdout_fd() const { return out_; }
  int stderr_fd() const { return err_; }
  // Writes all bytes to stdin; false on EPIPE (the child closed stdin). SIGPIPE is never
  // raised (it is blocked and consumed on this thread, or turned off for the pipe on macOS).
  bool write_all(const char* data, std::size_t size);
  void close_stdin();
  // Sends a signal unless the child has been reaped (so a recycled pid is never hit).
  void signal(int sig);
  // Blocks until the child exits, then reaps it. signal() from another thread meanwhile
  // never waits for it.
  ExitStatus wait();

 private:
  long pid_ = -1;
  int in_ = -1, out_ = -1, err_ = -1;
  std::mutex mutex_;  // guards reaped_ against signal()
  bool reaped_ = false;
};

// The environment for a worker: this process's (if inherit) with overrides applied.
std::vector<std::string> build_environment(const std::map<std::string, std::string>& overrides,
                                           bool inherit);

// Transport over a Subprocess: a thread reads stdout, one drains stderr (a full stderr pipe
// would block the worker), and a third reaps the child. The exit is reported once both
// pipes are at EOF, or 1 s after the exit when a grandchild still holds them open.
class ProcessTransport : public Transport {
 public:
  explicit ProcessTransport(const SpawnOptions& options);
  ~ProcessTransport() override;

  void start(TransportSink* sink) override;
  bool write_line(std::string_view line) override;
  void close_input() override;
  void terminate() override;
  void kill() override;
  bool wait_exit(std::chrono::milliseconds timeout) override;
  std::optional<long> pid() const override { return process_.pid(); }

 private:
  void read_stdout();
  void read_stderr();
  void reap();
  // Reads from fd; false at EOF, on error, or once the reaper has written to wake_.
  bool read_some(int fd, char* buf, std::size_t size, std::size_t& got);

  Subprocess process_;
  TransportSink* sink_ = nullptr;
  int wake_[2] = {-1, -1};  // the reaper's "stop reading" to both readers
  std::thread out_thread_, err_thread_, reaper_thread_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stdout_done_ = false;
  bool stderr_done_ = false;
  bool exited_ = false;
};

}  // namespace mlx_worker
