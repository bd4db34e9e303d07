#include "mlx_worker/process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

extern char** environ;

namespace mlx_worker {
namespace {

std::string errno_text(const char* what, int err) { return std::string(what) + ": " + std::strerror(err); }

// A close-on-exec fd numbered 3 or above, so dup2 onto 0/1/2 in the child always
// happens (dup2 onto the same number would keep close-on-exec set).
int high_cloexec(int fd) {
  if (fd > 2) {
    if (::fcntl(fd, F_SETFD, FD_CLOEXEC) != 0) throw SpawnError(errno_text("fcntl", errno));
    return fd;
  }
  int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
  int err = errno;
  ::close(fd);
  if (moved < 0) throw SpawnError(errno_text("fcntl", err));
  return moved;
}

void make_pipe(int fds[2]) {
#ifdef __linux__
  if (::pipe2(fds, O_CLOEXEC) != 0) throw SpawnError(errno_text("pipe2", errno));
#else
  // Between pipe() and fcntl() another thread's fork could inherit the fds; on macOS
  // POSIX_SPAWN_CLOEXEC_DEFAULT below keeps our own child clean regardless.
  if (::pipe(fds) != 0) throw SpawnError(errno_text("pipe", errno));
#endif
  fds[0] = high_cloexec(fds[0]);
  fds[1] = high_cloexec(fds[1]);
}

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

ExitStatus decode(int status) {
  ExitStatus s;
  if (WIFEXITED(status)) s.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) s.signal = WTERMSIG(status);
  return s;
}

}  // namespace

Subprocess::Subprocess(const std::string& program, const std::vector<std::string>& args,
                       const std::vector<std::string>& environment, const std::string& cwd) {
  int in[2], out[2], err[2];
  make_pipe(in);
  try {
    make_pipe(out);
  } catch (...) {
    ::close(in[0]), ::close(in[1]);
    throw;
  }
  try {
    make_pipe(err);
  } catch (...) {
    ::close(in[0]), ::close(in[1]), ::close(out[0]), ::close(out[1]);
    throw;
  }
#ifdef F_SETNOSIGPIPE
  ::fcntl(in[1], F_SETNOSIGPIPE, 1);  // macOS: EPIPE instead of SIGPIPE on this fd
#endif

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in[0], 0);
  posix_spawn_file_actions_adddup2(&actions, out[1], 1);
  posix_spawn_file_actions_adddup2(&actions, err[1], 2);
  if (!cwd.empty()) posix_spawn_file_actions_addchdir_np(&actions, cwd.c_str());

  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // The child starts with default signal handling (a host that ignores SIGPIPE or
  // SIGTERM must not pass that on) and an empty signal mask.
  sigset_t all, none;
  sigfillset(&all);
  sigemptyset(&none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setsigmask(&attr, &none);
  short flags = POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK;
#ifdef POSIX_SPAWN_CLOEXEC_DEFAULT
  flags |= POSIX_SPAWN_CLOEXEC_DEFAULT;
#endif
  posix_spawnattr_setflags(&attr, flags);

  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(program.c_str()));
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (const auto& e : environment) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);

  pid_t pid = -1;
  int rc = ::posix_spawnp(&pid, program.c_str(), &actions, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  ::close(in[0]);
  ::close(out[1]);
  ::close(err[1]);
  if (rc != 0) {
    ::close(in[1]), ::close(out[0]), ::close(err[0]);
    throw SpawnError("cannot start " + program + ": " + std::strerror(rc));
  }
  pid_ = pid;
  in_ = in[1];
  out_ = out[0];
  err_ = err[0];
}

Subprocess::~Subprocess() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!reaped_ && pid_ > 0) {
      // Never leave a zombie or an orphan behind.
      ::kill(static_cast<pid_t>(pid_), SIGKILL);
    }
  }
  if (!reaped_ && pid_ > 0) wait();
  close_fd(in_);
  close_fd(out_);
  close_fd(err_);
}

bool Subprocess::write_all(const char* data, std::size_t size) {
  if (in_ < 0) return false;
#ifndef F_SETNOSIGPIPE
  // Block SIGPIPE on this thread for the write; consume the one an EPIPE raises, unless
  // one was already pending before (that belongs to someone else).
  sigset_t pipe_set, old;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
  sigset_t pending;
  sigpending(&pending);
  bool was_pending = sigismember(&pending, SIGPIPE);
#endif
  bool ok = true;
  while (size > 0) {
    ssize_t n = ::write(in_, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      ok = false;  // EPIPE (the child closed stdin) or worse: the child is unusable
      break;
    }
    data += n;
    size -= static_cast<std::size_t>(n);
  }
#ifndef F_SETNOSIGPIPE
  if (!ok && errno == EPIPE && !was_pending) {
    struct timespec zero = {0, 0};
    while (sigtimedwait(&pipe_set, nullptr, &zero) < 0 && errno == EINTR) {
    }
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
#endif
  return ok;
}

void Subprocess::close_stdin() { close_fd(in_); }

void Subprocess::signal(int sig) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!reaped_ && pid_ > 0) ::kill(static_cast<pid_t>(pid_), sig);
}

ExitStatus Subprocess::wait() {
  const auto pid = static_cast<pid_t>(pid_);
  int status = 0;
  pid_t r;
#if defined(WNOWAIT) && !defined(__APPLE__)
  // Wait without reaping and without the lock, then reap under the lock: signal() never
  // races a recycled pid and never waits for the child.
  siginfo_t info;
  while (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT) < 0 && errno == EINTR) {
  }
  std::lock_guard<std::mutex> lock(mutex_);
  while ((r = ::waitpid(pid, &status, 0)) < 0 && errno == EINTR) {
  }
#else
  // macOS: no dependable non-reaping wait, so poll. Each try reaps under the lock (a
  // signal() can't hit a recycled pid); the sleeps between tries hold no lock, so
  // signal() and close()'s escalation never wait for the child.
  for (auto pause = std::chrono::milliseconds(1);; pause = std::min(pause * 2, std::chrono::milliseconds(50))) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while ((r = ::waitpid(pid, &status, WNOHANG)) < 0 && errno == EINTR) {
      }
      if (r != 0) {
        reaped_ = true;
        if (r < 0) return ExitStatus{};  // reaped elsewhere (SIGCHLD set to SIG_IGN)
        return decode(status);
      }
    }
    std::this_thread::sleep_for(pause);
  }
#endif
  reaped_ = true;
  if (r < 0) return ExitStatus{};  // reaped elsewhere (e.g. a SIGCHLD handler set to SIG_IGN)
  return decode(status);
}

std::vector<std::string> build_environment(const std::map<std::string, std::string>& overrides,
                                           bool inherit) {
  std::vector<std::string> out;
  if (inherit) {
    for (char** e = environ; e && *e; ++e) {
      std::string entry(*e);
      auto eq = entry.find('=');
      if (overrides.count(entry.substr(0, eq))) continue;
      out.push_back(std::move(entry));
    }
  }
  for (const auto& [k, v] : overrides) out.push_back(k + "=" + v);
  return out;
}

ProcessTransport::ProcessTransport(const SpawnOptions& o)
    : process_(o.python, o.args, build_environment(o.env, o.inherit_env), o.cwd) {
  make_pipe(wake_);
}

ProcessTransport::~ProcessTransport() {
  if (reaper_thread_.joinable()) {
    process_.signal(SIGKILL);
    reaper_thread_.join();  // it stops the readers before it ends
    out_thread_.join();
    err_thread_.join();
  }
  close_fd(wake_[0]);
  close_fd(wake_[1]);
}

void ProcessTransport::start(TransportSink* sink) {
  sink_ = sink;
  err_thread_ = std::thread([this] { read_stderr(); });
  out_thread_ = std::thread([this] { read_stdout(); });
  reaper_thread_ = std::thread([this] { reap(); });
}

bool ProcessTransport::read_some(int fd, char* buf, std::size_t size, std::size_t& got) {
  for (;;) {
    struct pollfd fds[2] = {{fd, POLLIN, 0}, {wake_[0], POLLIN, 0}};
    int n = ::poll(fds, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    // The wake-up comes a grace period after the exit: what the worker wrote has been read
    // by then, and a grandchild that keeps writing must not keep us here.
    if (fds[1].revents) return false;
    if (fds[0].revents) {
      ssize_t r = ::read(fd, buf, size);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return false;
      got = static_cast<std::size_t>(r);
      return true;
    }
  }
}

void ProcessTransport::read_stderr() {
  char buf[4096];
  std::size_t n;
  while (read_some(process_.stderr_fd(), buf, sizeof buf, n)) sink_->on_stderr(buf, n);
  std::lock_guard<std::mutex> lock(mutex_);
  stderr_done_ = true;
  cv_.notify_all();
}

void ProcessTransport::read_stdout() {
  char buf[65536];
  std::size_t n;
  while (read_some(process_.stdout_fd(), buf, sizeof buf, n)) sink_->on_stdout(buf, n);
  std::lock_guard<std::mutex> lock(mutex_);
  stdout_done_ = true;
  cv_.notify_all();
}

void ProcessTransport::reap() {
  ExitStatus status = process_.wait();
  {
    // Normally both pipes reach EOF right after the exit. A grandchild that inherited them
    // keeps them open: then stop reading after a grace period (as the TypeScript client
    // does) rather than leave every pending call waiting on it.
    std::unique_lock<std::mutex> lock(mutex_);
    if (!cv_.wait_for(lock, std::chrono::seconds(1), [this] { return stdout_done_ && stderr_done_; })) {
      char byte = 1;
      while (::write(wake_[1], &byte, 1) < 0 && errno == EINTR) {
      }
      // The readers see the wake-up within one read: on_exit still comes after the
      // last on_stdout.
      cv_.wait(lock, [this] { return stdout_done_ && stderr_done_; });
    }
  }
  sink_->on_exit(status);
  std::lock_guard<std::mutex> lock(mutex_);
  exited_ = true;
  cv_.notify_all();
}

bool ProcessTransport::write_line(std::string_view line) { return process_.write_all(line.data(), line.size()); }

void ProcessTransport::close_input() { process_.close_stdin(); }

void ProcessTransport::terminate() { process_.signal(SIGTERM); }

void ProcessTransport::kill() { process_.signal(SIGKILL); }

bool ProcessTransport::wait_exit(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  return cv_.wait_for(lock, timeout, [this] { return exited_; });
}

}  // namespace mlx_worker
