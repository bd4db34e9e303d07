// The Client against a real `python -m mlx_worker` on the tiny-llama fixture
// (issue 12, tests 1-9; test 7's pure splitter cases are in splitter_test.cpp).
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>

#include "mlx_worker/client.hpp"
#include "test_support.hpp"

using namespace mlx_worker;
using namespace std::chrono_literals;
using test_support::worker_options;
using Clock = std::chrono::steady_clock;

namespace {

bool valid_utf8(const std::string& s) {
  std::size_t i = 0;
  while (i < s.size()) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    std::size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (std::size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 0x2) return false;
    }
    i += n;
  }
  return true;
}

// Records a generate's events; lets a test wait for the first token.
struct Recorder {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<GenerateEvent> events;
  std::vector<std::string> methods;

  GenerateHandler handler() {
    return [this](const GenerateEvent& e) {
      std::lock_guard<std::mutex> lock(mutex);
      events.push_back(e);
      cv.notify_all();
    };
  }
  bool wait_first_token(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mutex);
    return cv.wait_for(lock, timeout, [this] { return token_count_locked() > 0; });
  }
  std::size_t token_count_locked() const {
    std::size_t n = 0;
    for (const auto& e : events) n += std::holds_alternative<TokenEvent>(e);
    return n;
  }
  std::string text() {
    std::lock_guard<std::mutex> lock(mutex);
    std::string out;
    for (const auto& e : events) {
      if (auto* t = std::get_if<TokenEvent>(&e)) out += t->text;
    }
    return out;
  }
  std::vector<std::int64_t> tokens() {
    std::lock_guard<std::mutex> lock(mutex);
    std::vector<std::int64_t> out;
    for (const auto& e : events) {
      if (auto* t = std::get_if<TokenEvent>(&e)) out.insert(out.end(), t->tokens.begin(), t->tokens.end());
    }
    return out;
  }
  std::vector<std::int64_t> ids() {
    std::lock_guard<std::mutex> lock(mutex);
    std::vector<std::int64_t> out;
    for (const auto& e : events) {
      const RequestId& id = std::visit([](const auto& ev) -> const RequestId& { return ev.id; }, e);
      out.push_back(std::get<std::int64_t>(id));
    }
    return out;
  }
};

GenerateParams greedy(const std::string& prompt, std::int64_t max_tokens) {
  GenerateParams p;
  p.prompt = prompt;
  p.max_tokens = max_tokens;
  p.temperature = 0.0;
  p.ignore_eos = true;
  return p;
}

// One worker with tiny-llama loaded as "tiny", shared by the tests that leave it serving.
class Worker : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto options = worker_options();
    options.line_observer = [](std::string_view line) {
      std::lock_guard<std::mutex> lock(lines_mutex_);
      lines_.emplace_back(line);
    };
    client_ = Client::spawn(options).release();
    client_->load(test_support::model_path(), std::string("tiny"));
  }
  static void TearDownTestSuite() {
    delete client_;
    client_ = nullptr;
  }
  static std::vector<std::string> lines() {
    std::lock_guard<std::mutex> lock(lines_mutex_);
    return lines_;
  }
  static Client* client_;
  static std::mutex lines_mutex_;
  static std::vector<std::string> lines_;
};
Client* Worker::client_ = nullptr;
std::mutex Worker::lines_mutex_;
std::vector<std::string> Worker::lines_;

}  // namespace

// ---- 1. ready first, protocol version, bad interpreter --------------------------------

TEST(Spawn, ReadyIsTheFirstLineAndItsVersionIsChecked) {
  std::vector<std::string> lines;
  std::mutex m;
  auto options = worker_options();
  options.line_observer = [&](std::string_view line) {
    std::lock_guard<std::mutex> lock(m);
    lines.emplace_back(line);
  };
  auto worker = Client::spawn(options);
  const ReadyEvent& ready = worker->wait_ready(1s);
  EXPECT_TRUE(protocol_compatible(ready.protocol_version));
  EXPECT_EQ(ready.pid, *worker->pid());
  EXPECT_FALSE(ready.capabilities.methods.empty());
  worker->status();
  std::lock_guard<std::mutex> lock(m);
  ASSERT_GE(lines.size(), 2u);
  auto first = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(first["method"], "ready");
}

TEST(Spawn, ProtocolMajorVersionMustMatch) {
  EXPECT_TRUE(protocol_compatible("1.0"));
  EXPECT_TRUE(protocol_compatible("1.7"));
  EXPECT_FALSE(protocol_compatible("2.0"));
  EXPECT_FALSE(protocol_compatible("10.0"));
  EXPECT_FALSE(protocol_compatible(""));

  // A process that announces protocol 2.0 is refused and ended.
  SpawnOptions o;
  o.python = "/bin/sh";
  o.args = {"-c",
            R"(printf '%s\n' '{"jsonrpc":"2.0","method":"ready","params":{"protocol_version":"2.0","worker_version":"9","mlx_version":"0","device":"cpu","pid":1,"capabilities":{"methods":[],"max_line_bytes":1,"batch":false,"constraints":[],"constraint_engines":[],"vision":false}}}'; exec sleep 30)"};
  auto start = Clock::now();
  EXPECT_THROW(Client::spawn(o), ProtocolError);
  EXPECT_LT(Clock::now() - start, 5s);
}

TEST(Spawn, BadInterpreterFailsFast) {
  auto options = worker_options();
  options.python = "/nonexistent/bin/python3";
  auto start = Clock::now();
  EXPECT_THROW(Client::spawn(options), SpawnError);
  EXPECT_LT(Clock::now() - start, 2s);

  // An interpreter that runs but exits before `ready`: WorkerExited with its stderr.
  options = worker_options();
  options.args = {"-c", "import sys; sys.stderr.write('no worker here\\n'); sys.exit(3)"};
  start = Clock::now();
  try {
    Client::spawn(options);
    FAIL() << "spawn succeeded";
  } catch (const WorkerExited& e) {
    EXPECT_EQ(e.exit_code(), 3);
    EXPECT_NE(e.stderr_tail().find("no worker here"), std::string::npos) << e.stderr_tail();
  }
  EXPECT_LT(Clock::now() - start, 5s);
}

// ---- 2. load -------------------------------------------------------------------------

TEST_F(Worker, LoadAndAMissingFolderIsTyped) {
  LoadResult again = client_->load(test_support::model_path(), std::string("tiny"));
  EXPECT_EQ(again.model_id, "tiny");
  EXPECT_EQ(again.kind, "text");
  EXPECT_GT(again.vocab_size, 0);
  EXPECT_EQ(again.already_loaded, true);
  try {
    client_->load(test_support::repo_root() + "/no/such/model", std::string("missing"));
    FAIL() << "load of a missing folder succeeded";
  } catch (const RpcError& e) {
    EXPECT_EQ(e.code(), errc::model_path_not_found);
  }
  StatusResult status = client_->status();
  ASSERT_EQ(status.models.size(), 1u);
  EXPECT_EQ(status.models[0].model_id, "tiny");
}

// ---- 3. streamed generate ------------------------------------------------------------

TEST_F(Worker, StreamedGenerateAddsUpToTheResult) {
  Recorder rec;
  GenerateParams p = greedy("Ünïcödé 中文 🙂", 40);
  GenerateResult result = client_->generate(p, rec.handler());
  ASSERT_FALSE(rec.events.empty());
  EXPECT_TRUE(std::holds_alternative<ProgressEvent>(rec.events.front())) << "progress comes before tokens";
  EXPECT_EQ(rec.text(), result.text);
  EXPECT_EQ(rec.tokens(), result.tokens);
  EXPECT_EQ(result.tokens.size(), 40u);
  EXPECT_EQ(result.stop_reason, "max_tokens");
  for (const auto& e : rec.events) {
    if (auto* t = std::get_if<TokenEvent>(&e)) EXPECT_TRUE(valid_utf8(t->text)) << t->text;
  }
  // Greedy is deterministic.
  GenerateResult again = client_->generate(p);
  EXPECT_EQ(again.tokens, result.tokens);
  EXPECT_EQ(again.text, result.text);
}

TEST_F(Worker, MultiByteTextAndReplacementCharactersStayWhole) {
  // "é" is one token; "日" is three byte tokens. Favouring "é" and the lead byte of "日"
  // makes the model write "é" and lone lead bytes, which decode to U+FFFD.
  TokenizeParams tp;
  tp.text = "é";
  tp.add_special_tokens = false;
  auto e_acute = client_->call(tp).tokens;
  tp.text = "日";
  auto ri = client_->call(tp).tokens;
  ASSERT_EQ(ri.size(), 3u);
  const std::string fffd = "\xEF\xBF\xBD";
  bool saw_both = false;
  for (std::uint64_t seed = 0; seed < 4; ++seed) {
    GenerateParams p;
    p.prompt = "héllo 日本";
    p.max_tokens = 24;
    p.temperature = 1.0;
    p.seed = seed;
    p.ignore_eos = true;
    p.logit_bias = std::map<std::string, double>{{std::to_string(ri[0]), 30.0}};
    for (auto t : e_acute) (*p.logit_bias)[std::to_string(t)] = 30.0;
    Recorder rec;
    GenerateResult result = client_->generate(p, rec.handler());
    EXPECT_EQ(result.seed, seed);
    EXPECT_EQ(rec.text(), result.text);
    EXPECT_TRUE(valid_utf8(result.text));
    for (const auto& e : rec.events) {
      if (auto* t = std::get_if<TokenEvent>(&e)) EXPECT_TRUE(valid_utf8(t->text));
    }
    saw_both |= result.text.find("é") != std::string::npos && result.text.find(fffd) != std::string::npos;
  }
  EXPECT_TRUE(saw_both) << "no run produced both a multi-byte character and U+FFFD";
}

TEST_F(Worker, SeedsAbove2To63RoundTrip) {
  GenerateParams p = greedy("seed", 2);
  p.temperature = 1.0;
  p.seed = 18446744073709551615ull;  // 2^64 - 1: needs uint64_t end to end
  EXPECT_EQ(client_->generate(p).seed, 18446744073709551615ull);
}

// ---- 4. pipelining -------------------------------------------------------------------

TEST_F(Worker, StatusIsAnsweredWhileAGenerateRuns) {
  Recorder rec;
  auto running = client_->generate_async(greedy("pipelining", 3000), rec.handler());
  ASSERT_TRUE(rec.wait_first_token(20s));
  StatusResult status = client_->status();
  EXPECT_FALSE(running.wait_for(0ms)) << "status waited for the generate";
  ASSERT_TRUE(status.queue.active.has_value());
  EXPECT_EQ(std::get<std::int64_t>(*status.queue.active), running.id());
  EXPECT_TRUE(client_->cancel(running.id()));
  EXPECT_EQ(running.get().stop_reason, "cancelled");
}

TEST_F(Worker, TwoGeneratesInFlightGetTheirOwnEvents) {
  Recorder a, b;
  auto first = client_->generate_async(greedy("first prompt", 30), a.handler());
  auto second = client_->generate_async(greedy("a different second prompt", 17), b.handler());
  GenerateResult ra = first.get();
  GenerateResult rb = second.get();
  for (auto id : a.ids()) EXPECT_EQ(id, first.id());
  for (auto id : b.ids()) EXPECT_EQ(id, second.id());
  EXPECT_EQ(a.tokens(), ra.tokens);
  EXPECT_EQ(b.tokens(), rb.tokens);
  EXPECT_EQ(a.text(), ra.text);
  EXPECT_EQ(b.text(), rb.text);
  EXPECT_EQ(ra.tokens.size(), 30u);
  EXPECT_EQ(rb.tokens.size(), 17u);
  // The same request alone gives the same tokens.
  EXPECT_EQ(client_->generate(greedy("a different second prompt", 17)).tokens, rb.tokens);
}

// ---- 5. cancel -----------------------------------------------------------------------

TEST_F(Worker, CancelMidStream) {
  Recorder rec;
  auto call = client_->generate_async(greedy("cancel me", 3000), rec.handler());
  ASSERT_TRUE(rec.wait_first_token(20s));
  EXPECT_TRUE(client_->cancel(call.id()));
  GenerateResult result = call.get();
  EXPECT_EQ(result.stop_reason, "cancelled");
  EXPECT_LT(result.tokens.size(), 3000u);
  EXPECT_EQ(rec.text(), result.text);
  EXPECT_FALSE(client_->cancel(call.id())) << "a finished request";
  EXPECT_FALSE(client_->cancel(987654321)) << "an unknown id";
}

TEST_F(Worker, CancelFromTheEventCallback) {
  // The callback runs on the reader thread: cancel_async works there, and a blocking
  // call is refused instead of deadlocking.
  std::atomic<std::int64_t> id{0};
  std::atomic<bool> refused{false};
  std::atomic<bool> sent{false};
  std::optional<Pending<CancelResult>> cancel;
  std::mutex m;
  auto call = client_->generate_async(greedy("cancel from callback", 3000), [&](const GenerateEvent& e) {
    if (!std::holds_alternative<TokenEvent>(e) || sent.exchange(true)) return;
    try {
      client_->status();
    } catch (const std::logic_error&) {
      refused = true;
    }
    std::lock_guard<std::mutex> lock(m);
    cancel.emplace(client_->cancel_async(id.load()));
  });
  id = call.id();
  GenerateResult result = call.get();
  EXPECT_EQ(result.stop_reason, "cancelled");
  EXPECT_TRUE(refused.load());
  std::lock_guard<std::mutex> lock(m);
  ASSERT_TRUE(cancel.has_value());
  EXPECT_TRUE(cancel->get().cancelled);
}

// ---- 6. errors -----------------------------------------------------------------------

TEST_F(Worker, InvalidParamsNameTheFieldAndTheWorkerKeepsServing) {
  auto expect_invalid = [&](const std::string& method, const nlohmann::json& params, const std::string& field) {
    try {
      client_->request(method, params);
      ADD_FAILURE() << method << " " << params.dump() << " succeeded";
    } catch (const RpcError& e) {
      EXPECT_EQ(e.code(), errc::invalid_params) << e.what();
      // data.field names it, or (for an unknown field) data.field is "params" and the message names it
      EXPECT_NE((e.field() + " " + e.rpc_message()).find(field), std::string::npos) << e.what();
      EXPECT_EQ(e.field().rfind("params", 0), 0u) << e.field();
    }
    EXPECT_EQ(client_->status().models.size(), 1u);
  };
  expect_invalid("generate", {{"prompt", "x"}, {"max_tokens", -1}}, "max_tokens");
  expect_invalid("generate", {{"prompt", "x"}, {"no_such_option", true}}, "no_such_option");
  expect_invalid("generate", {{"prompt", "x"}, {"ignore_eos", nullptr}}, "ignore_eos");
  expect_invalid("generate", {{"prompt", "x"}, {"temperature", "hot"}}, "temperature");
  try {
    client_->request("no_such_method");
    ADD_FAILURE() << "unknown method succeeded";
  } catch (const RpcError& e) {
    EXPECT_EQ(e.code(), errc::method_not_found);
  }
  // A string that is not UTF-8 is refused before it is sent (the worker could not tell
  // whose request its -32700 answers).
  EXPECT_THROW(client_->request("tokenize", {{"text", "\xC3("}}), nlohmann::json::type_error);
  EXPECT_EQ(client_->status().models.size(), 1u);
  // The generated types never send null for an unset option.
  GenerateParams p;
  p.prompt = "x";
  EXPECT_EQ(nlohmann::json(p).dump(), R"({"prompt":"x"})");
  p.max_tokens = 1;
  EXPECT_EQ(client_->generate(p).tokens.size(), 1u);
}

// ---- 7. the splitter on the worker's own output --------------------------------------

TEST_F(Worker, RealOutputSplitInAnyChunksGivesTheSameLines) {
  client_->generate(greedy("Ünïcödé 中文 🙂 splitting", 30));
  std::vector<std::string> expected = lines();
  ASSERT_GT(expected.size(), 30u);
  std::string stream;
  for (const auto& l : expected) stream += l + "\n";
  std::mt19937 rng(7);
  for (int max_chunk : {1, 2, 3, 5, 64, 4096}) {
    LineSplitter splitter;
    std::vector<std::string> got;
    std::uniform_int_distribution<int> size(1, max_chunk);
    for (std::size_t at = 0; at < stream.size();) {
      std::size_t n = std::min<std::size_t>(static_cast<std::size_t>(size(rng)), stream.size() - at);
      splitter.feed(stream.data() + at, n, [&](std::string_view l) { got.emplace_back(l); });
      at += n;
    }
    ASSERT_EQ(got, expected) << "chunks of up to " << max_chunk;
  }
}

namespace {

// A host-side transport in the style of a QProcess host: the host owns the process and
// its event loop and feeds the Client whatever it reads, here in random pieces of 1-7
// bytes (test 7 through the whole Client).
class ChunkingTransport : public Transport {
 public:
  explicit ChunkingTransport(const SpawnOptions& o)
      : process_(o.python, o.args, build_environment(o.env, o.inherit_env), o.cwd) {}
  ~ChunkingTransport() override {
    process_.signal(SIGKILL);
    if (out_.joinable()) out_.join();
    if (err_.joinable()) err_.join();
  }
  void start(TransportSink* sink) override {
    err_ = std::thread([this, sink] {
      char buf[4096];
      ssize_t n;
      while ((n = ::read(process_.stderr_fd(), buf, sizeof buf)) > 0) sink->on_stderr(buf, static_cast<size_t>(n));
    });
    out_ = std::thread([this, sink] {
      std::mt19937 rng(99);
      std::uniform_int_distribution<int> piece(1, 7);
      char buf[4096];
      ssize_t n;
      while ((n = ::read(process_.stdout_fd(), buf, sizeof buf)) > 0) {
        for (ssize_t at = 0; at < n;) {
          ssize_t k = std::min<ssize_t>(piece(rng), n - at);
          sink->on_stdout(buf + at, static_cast<size_t>(k));
          at += k;
        }
      }
      ExitStatus status = process_.wait();
      err_.join();
      sink->on_exit(status);
      std::lock_guard<std::mutex> lock(m_);
      exited_ = true;
      cv_.notify_all();
    });
  }
  bool write_line(std::string_view line) override { return process_.write_all(line.data(), line.size()); }
  void close_input() override { process_.close_stdin(); }
  void terminate() override { process_.signal(SIGTERM); }
  void kill() override { process_.signal(SIGKILL); }
  bool wait_exit(std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(m_);
    return cv_.wait_for(lock, timeout, [this] { return exited_; });
  }
  std::optional<long> pid() const override { return process_.pid(); }

 private:
  Subprocess process_;
  std::thread out_, err_;
  std::mutex m_;
  std::condition_variable cv_;
  bool exited_ = false;
};

}  // namespace

TEST(Transport, AHostTransportFeedingTinyPiecesWorks) {
  Client client(std::make_unique<ChunkingTransport>(worker_options()));
  client.wait_ready(30s);
  client.load(test_support::model_path(), std::string("tiny"));
  Recorder rec;
  GenerateResult result = client.generate(greedy("Ünïcödé 中文 🙂", 24), rec.handler());
  EXPECT_EQ(rec.text(), result.text);
  EXPECT_EQ(rec.tokens(), result.tokens);
  EXPECT_TRUE(valid_utf8(result.text));
  EXPECT_EQ(client.close().exit_code, 0);
}

// ---- 8. shutdown, stdin EOF, close() escalation --------------------------------------

TEST(Lifecycle, ShutdownExitsZeroQuickly) {
  auto worker = Client::spawn(worker_options());
  auto start = Clock::now();
  EXPECT_TRUE(worker->call(ShutdownParams{}).shutting_down);
  auto status = worker->wait_exit(5s);
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(status->exit_code, 0);
  EXPECT_LT(Clock::now() - start, 2500ms);
  EXPECT_THROW(worker->status(), WorkerExited);
}

TEST(Lifecycle, StdinEofExitsZeroQuickly) {
  auto worker = Client::spawn(worker_options());
  auto start = Clock::now();
  worker->close_input();
  auto status = worker->wait_exit(5s);
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(status->exit_code, 0);
  EXPECT_LT(Clock::now() - start, 2500ms);
}

TEST(Lifecycle, CloseSendsSigtermToAWorkerThatIgnoresShutdown) {
  SpawnOptions o;
  o.python = "/bin/sh";
  o.args = {"-c",
            R"(printf '%s\n' '{"jsonrpc":"2.0","method":"ready","params":{"protocol_version":"1.0","worker_version":"0","mlx_version":"0","device":"cpu","pid":1,"capabilities":{"methods":[],"max_line_bytes":1,"batch":false,"constraints":[],"constraint_engines":[],"vision":false}}}'; exec sleep 30)"};
  auto worker = Client::spawn(o);
  auto pending = worker->send("status");
  ExitStatus status = worker->close({300ms, 3000ms, 3000ms});
  EXPECT_EQ(status.signal, SIGTERM);
  EXPECT_THROW(pending.get(), WorkerExited);
}

TEST(Lifecycle, CloseSendsSigkillWhenSigtermIsNotEnough) {
  auto worker = Client::spawn(worker_options());
  pid_t pid = static_cast<pid_t>(*worker->pid());
  ASSERT_EQ(::kill(pid, SIGSTOP), 0);  // it can act on neither shutdown nor SIGTERM now
  auto start = Clock::now();
  ExitStatus status = worker->close({300ms, 300ms, 5000ms});
  EXPECT_EQ(status.signal, SIGKILL);
  EXPECT_LT(Clock::now() - start, 3s);
  EXPECT_EQ(::kill(pid, 0), -1);
  EXPECT_EQ(errno, ESRCH) << "the worker was not reaped";
}

// ---- 9. kill -9 mid-generate ---------------------------------------------------------

TEST(Lifecycle, KilledWorkerFailsEveryPendingAndLaterCall) {
  auto worker = Client::spawn(worker_options());
  worker->load(test_support::model_path(), std::string("tiny"));
  pid_t pid = static_cast<pid_t>(*worker->pid());
  Recorder rec;
  auto running = worker->generate_async(greedy("about to die", 3000), rec.handler());
  auto queued = worker->generate_async(greedy("queued behind it", 10));
  ASSERT_TRUE(rec.wait_first_token(20s));
  auto start = Clock::now();
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  for (auto* call : {&running, &queued}) {
    ASSERT_TRUE(call->wait_for(5s)) << "a pending call hangs after the worker died";
    try {
      call->get();
      ADD_FAILURE() << "a call survived the worker";
    } catch (const WorkerExited& e) {
      EXPECT_EQ(e.signal(), SIGKILL);
    }
  }
  EXPECT_LT(Clock::now() - start, 3s);
  EXPECT_THROW(worker->status(), WorkerExited);
  EXPECT_THROW(worker->generate_async(greedy("later", 1)), WorkerExited);
  EXPECT_THROW(worker->cancel(running.id()), WorkerExited);
  EXPECT_EQ(worker->close().signal, SIGKILL);
  EXPECT_EQ(::kill(pid, 0), -1);
  EXPECT_EQ(errno, ESRCH) << "the worker was not reaped";
}

// ---- SIGPIPE -------------------------------------------------------------------------

TEST(Lifecycle, WritingToAClosedStdinNeverRaisesSigpipe) {
  ::signal(SIGPIPE, SIG_DFL);  // as in a host that never touched it: SIGPIPE would kill us
  // A "worker" that announces itself, closes its stdin and stays alive.
  SpawnOptions o;
  o.python = "/bin/sh";
  o.args = {"-c",
            R"(printf '%s\n' '{"jsonrpc":"2.0","method":"ready","params":{"protocol_version":"1.0","worker_version":"0","mlx_version":"0","device":"cpu","pid":1,"capabilities":{"methods":[],"max_line_bytes":1,"batch":false,"constraints":[],"constraint_engines":[],"vision":false}}}'; exec 0<&-; exec sleep 30)"};
  auto worker = Client::spawn(o);
  std::this_thread::sleep_for(200ms);  // let it close stdin
  std::vector<Call> calls;
  for (int i = 0; i < 3; ++i) calls.push_back(worker->send("status"));  // EPIPE, no signal
  EXPECT_FALSE(calls[0].wait_for(100ms));
  sigset_t pending;
  sigpending(&pending);
  EXPECT_FALSE(sigismember(&pending, SIGPIPE));
  EXPECT_EQ(worker->close({200ms, 3000ms, 3000ms}).signal, SIGTERM);
  for (auto& call : calls) EXPECT_THROW(call.get(), WorkerExited);
}

// ---- the worker's exit is noticed even when a grandchild holds its stdout ------------

TEST(Lifecycle, ExitIsNoticedWhileAGrandchildHoldsStdout) {
  // A "worker" that announces itself, leaves a background process holding its stdout and
  // stderr, and exits 7 without answering.
  SpawnOptions o;
  o.python = "/bin/sh";
  o.args = {"-c",
            R"(printf '%s\n' '{"jsonrpc":"2.0","method":"ready","params":{"protocol_version":"1.0","worker_version":"0","mlx_version":"0","device":"cpu","pid":1,"capabilities":{"methods":[],"max_line_bytes":1,"batch":false,"constraints":[],"constraint_engines":[],"vision":false}}}'; sleep 20 & read line; exit 7)"};
  auto start = Clock::now();
  {
    auto worker = Client::spawn(o);
    auto pending = worker->send("status");  // the line it reads before exiting
    ASSERT_TRUE(pending.wait_for(5s)) << "a pending call hangs after the worker exited";
    try {
      pending.get();
      ADD_FAILURE() << "the call succeeded";
    } catch (const WorkerExited& e) {
      EXPECT_EQ(e.exit_code(), 7);
    }
    EXPECT_THROW(worker->status(), WorkerExited);
  }  // the destructor must not wait for the grandchild either
  EXPECT_LT(Clock::now() - start, 5s);
}

TEST(Lifecycle, SignalDoesNotWaitForAnotherThreadsWait) {
  // wait() blocks until the child exits; signal() from another thread meanwhile must go
  // through at once (on macOS wait() once held the lock while blocked in waitpid).
  Subprocess child("/bin/sh", {"-c", "exec sleep 30"}, build_environment({}, true), "");
  std::atomic<bool> waited{false};
  std::thread waiter([&] {
    child.wait();
    waited = true;
  });
  std::this_thread::sleep_for(100ms);  // let it block
  auto start = Clock::now();
  child.signal(SIGTERM);
  EXPECT_LT(Clock::now() - start, 1s);
  waiter.join();
  EXPECT_TRUE(waited.load());
}

// ---- a throwing event handler ---------------------------------------------------------

TEST_F(Worker, AThrowingHandlerCancelsTheGenerationAndSurfacesItsError) {
  struct HostBug : std::runtime_error {
    using std::runtime_error::runtime_error;
  };
  auto call = client_->generate_async(greedy("the handler throws", 3000), [](const GenerateEvent& e) {
    if (std::holds_alternative<TokenEvent>(e)) throw HostBug("host bug");
  });
  ASSERT_TRUE(call.wait_for(20s)) << "the generation ran on after its handler threw";
  EXPECT_THROW(call.get(), HostBug);
  // The worker was told: its response for this id says cancelled.
  std::string response;
  for (const auto& line : lines()) {
    auto m = nlohmann::json::parse(line);
    if (m.contains("result") && m["id"] == call.id()) response = line;
  }
  ASSERT_FALSE(response.empty());
  auto result = nlohmann::json::parse(response)["result"];
  EXPECT_EQ(result["stop_reason"], "cancelled");
  EXPECT_LT(result["tokens"].size(), 3000u);
}

// ---- issue 15: channels and tool calls, typed ------------------------------------------

TEST(Tools, ChannelsAndToolCallsAreTyped) {
  auto worker = Client::spawn(worker_options());
  LoadResult loaded = worker->load(test_support::tools_model_path(), std::string("qwen3"));
  EXPECT_EQ(loaded.tool_call_format, "json_tools");
  Tool weather;
  weather.function.name = "get_weather";
  weather.function.parameters = nlohmann::json{{"type", "object"},
                                               {"properties", {{"city", {{"type", "string"}, {"maxLength", 8}}}}},
                                               {"required", {"city"}},
                                               {"additionalProperties", false}};
  GenerateParams p;
  ChatMessage ask;
  ask.role = "user";
  ask.content = ChatMessageContent(std::string("Weather in Paris?"));
  p.messages = std::vector<ChatMessage>{ask};
  p.tools = std::vector<Tool>{weather};
  NamedToolChoice choice;
  choice.name = "get_weather";
  p.tool_choice = GenerateParamsToolChoice(choice);
  p.max_tokens = 40;
  p.temperature = 0.0;

  ChannelText texts;
  std::string all;
  std::vector<std::string> channels;
  GenerateResult r = worker->generate(p, [&](const GenerateEvent& e) {
    if (auto* t = std::get_if<TokenEvent>(&e)) {
      texts.add(*t);
      all += t->text;
      channels.push_back(channel_of(*t));
      if (channel_of(*t) == channel::tool_call) EXPECT_EQ(t->tool_call_index, 0);
    }
  });
  EXPECT_EQ(all, r.text);
  EXPECT_EQ(texts.content, r.content);
  EXPECT_EQ(texts.reasoning, r.reasoning);
  ASSERT_EQ(r.tool_calls.size(), 1u);
  EXPECT_EQ(r.tool_calls[0].name, "get_weather");
  EXPECT_TRUE(r.tool_calls[0].arguments.is_object());
  EXPECT_FALSE(r.tool_calls[0].id.empty());
  EXPECT_FALSE(r.invalid_tool_calls.has_value());
  // The call's streamed text is the call the result reports, parsed.
  ASSERT_EQ(texts.tool_calls.size(), 1u);
  auto streamed = nlohmann::json::parse(texts.tool_calls[0]);
  EXPECT_EQ(streamed["name"], r.tool_calls[0].name);
  EXPECT_EQ(streamed["arguments"], r.tool_calls[0].arguments);
  ASSERT_FALSE(channels.empty());
  EXPECT_EQ(channels.front(), channel::marker) << "the call starts at once: <tool_call>";
  EXPECT_EQ(worker->close().exit_code, 0);
}

// ---- embed ---------------------------------------------------------------------------

TEST_F(Worker, EmbedReturnsVectorsAndGenerateIsRefusedOnAnEmbeddingModel) {
  LoadResult loaded = client_->load(test_support::embed_model_path(), std::string("emb"));
  EXPECT_EQ(loaded.kind, "embedding");
  EmbedParams p;
  p.model_id = "emb";
  p.input = std::vector<EmbedParamsInputPart>{std::string("the model token"), std::string("a")};
  p.dimensions = 16;
  EmbedResult r = client_->embed(p);
  ASSERT_EQ(r.embeddings.size(), 2u);
  EXPECT_EQ(r.dimensions, 16);
  ASSERT_EQ(r.tokens.size(), 2u);
  EXPECT_EQ(r.usage.prompt_tokens, r.tokens[0] + r.tokens[1]);
  for (const auto& v : r.embeddings) {
    ASSERT_EQ(v.size(), 16u);
    double sum = 0;
    for (double x : v) sum += x * x;
    EXPECT_NEAR(sum, 1.0, 1e-4);
  }
  GenerateParams g = greedy("x", 1);
  g.model_id = "emb";
  try {
    client_->generate(g);
    FAIL() << "generate on an embedding model succeeded";
  } catch (const RpcError& e) {
    EXPECT_EQ(e.code(), errc::invalid_params);
  }
  UnloadParams u;
  u.model_id = "emb";
  client_->call(u);
}
