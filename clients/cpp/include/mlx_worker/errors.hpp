// The errors a Client call can throw.
#pragma once

#include <optional>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

namespace mlx_worker {

// Base of every error the client throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The worker answered a request with a JSON-RPC error object.
class RpcError : public Error {
 public:
  RpcError(int code, std::string message, nlohmann::json data);
  int code() const { return code_; }
  const std::string& rpc_message() const { return message_; }
  const nlohmann::json& data() const { return data_; }
  // data.field when present (the offending parameter of a -32602), else "".
  std::string field() const;

 private:
  int code_;
  std::string message_;
  nlohmann::json data_;
};

// How the worker process ended.
struct ExitStatus {
  std::optional<int> exit_code;  // set when it exited normally
  std::optional<int> signal;     // set when a signal killed it
  std::string describe() const;
};

// The worker is gone: every pending call and every later call fails with this.
class WorkerExited : public Error {
 public:
  WorkerExited(ExitStatus status, std::string stderr_tail);
  const ExitStatus& status() const { return status_; }
  std::optional<int> exit_code() const { return status_.exit_code; }
  std::optional<int> signal() const { return status_.signal; }
  // The last bytes the worker wrote to stderr (its traceback, if any).
  const std::string& stderr_tail() const { return stderr_tail_; }

 private:
  ExitStatus status_;
  std::string stderr_tail_;
};

// The worker could not be started (e.g. the interpreter path does not exist).
class SpawnError : public Error {
 public:
  using Error::Error;
};

// The worker said something this client cannot use: an incompatible protocol version,
// a line that is not JSON-RPC, no `ready` in time.
class ProtocolError : public Error {
 public:
  using Error::Error;
};

}  // namespace mlx_worker
