# Installs the Debian packages ssmx's build, tests and examples use, if any is missing.
# Sourced by .ci/run and examples/run_main.sh:
#
#   source .ci/install-deps.sh && ssmx_install_deps
#
# `apt-get update` runs at most once, and only when something is missing. Extra package
# names may be passed as arguments.

SSMX_DEB_PACKAGES=(
  cmake g++ make
  libeigen3-dev          # required by ssmx::ssmx
  doctest-dev            # tests
  libbenchmark-dev       # benchmarks
  libopenmpi-dev openmpi-bin  # distributed features (optional for now)
  nlohmann-json3-dev     # checkpoint metadata (optional for now)
  libcli11-dev           # examples' command lines (optional for now)
  python3-torch          # reference numbers for cross-checks
  clang libclang-rt-14-dev  # fuzzing: clang++ -fsanitize=fuzzer (libFuzzer's runtime is in libclang-rt-14-dev)
)

ssmx_install_deps() {
  local missing=() pkg
  for pkg in "${SSMX_DEB_PACKAGES[@]}" "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    echo "ssmx: all Debian packages present"
    return 0
  fi
  echo "ssmx: installing missing Debian packages: ${missing[*]}"
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "ssmx: not root and no sudo; install these packages: ${missing[*]}" >&2
      return 1
    fi
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}
