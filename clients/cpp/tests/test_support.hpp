// What the tests share: how to start a real worker on the fixture model.
#pragma once

#include <cstdlib>
#include <string>

#include "mlx_worker/client.hpp"

namespace test_support {

inline std::string env(const char* name, const char* fallback = "") {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}

inline std::string python() { return env("MLX_WORKER_PYTHON", "python3"); }
inline std::string repo_root() { return env("MLX_WORKER_REPO_ROOT", "."); }
inline std::string model_path() { return env("MLX_WORKER_TEST_MODEL"); }
// tiny-qwen3-tools: Qwen3's chat template and markers (<think>, <tool_call>).
inline std::string tools_model_path() { return env("MLX_WORKER_TOOLS_MODEL"); }
// tiny-bert-embed: an embedding model (mean pooling), for `embed`.
inline std::string embed_model_path() { return env("MLX_WORKER_EMBED_MODEL"); }

// A real `python -m mlx_worker` run from the repository root.
inline mlx_worker::SpawnOptions worker_options() {
  mlx_worker::SpawnOptions o;
  o.python = python();
  o.cwd = repo_root();
  o.env["PYTHONPATH"] = repo_root();
  o.env["HF_HUB_OFFLINE"] = "1";
  o.env["TRANSFORMERS_VERBOSITY"] = "error";
  return o;
}

}  // namespace test_support
