// Progress display: on a terminal, one bar redrawn in place after every step; otherwise
// (a log file, a pipe, CI) a plain line every --print-every steps, so logs stay readable.
// Under mpirun always plain lines: Open MPI hands each rank a pseudo-terminal even when
// mpirun's own output goes to a file.
// Part of the trainer; include examples/train/trainer.hpp instead.
#pragma once

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

namespace train {

// "45s", "12m05s", "3h20m".
inline std::string format_duration(double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return "?";
  const auto s = static_cast<long long>(seconds + 0.5);
  char buf[32];
  if (s < 60)
    std::snprintf(buf, sizeof buf, "%llds", s);
  else if (s < 3600)
    std::snprintf(buf, sizeof buf, "%lldm%02llds", s / 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", s / 3600, s / 60 % 60);
  return buf;
}

// "950", "12.3k", "4.56M".
inline std::string format_count(double v) {
  char buf[32];
  if (v < 1e3)
    std::snprintf(buf, sizeof buf, "%.0f", v);
  else if (v < 1e6)
    std::snprintf(buf, sizeof buf, "%.1fk", v / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  return buf;
}

struct ProgressInfo {
  std::int64_t step = 0, total = 0;
  double loss = 0, accuracy = 0;
  double tokens_per_s = 0;
  double peak_bytes = 0;
  double eta_seconds = -1;  // < 0: unknown
};

class Progress {
 public:
  explicit Progress(std::int64_t print_every, bool bar = true)
      : tty_(bar && isatty(STDOUT_FILENO) == 1), every_(print_every) {}
  bool tty() const { return tty_; }

  void update(const ProgressInfo& p) {
    char stats[200];
    std::snprintf(stats, sizeof stats, "loss %.4f  acc %.3f  %s tok/s  peak %.1f MiB  ETA %s", p.loss, p.accuracy,
                  format_count(p.tokens_per_s).c_str(), p.peak_bytes / double(1 << 20),
                  format_duration(p.eta_seconds).c_str());
    if (!tty_) {
      if (p.step % every_ == 0 || p.step == p.total) {
        std::printf("step %lld/%lld  %s\n", static_cast<long long>(p.step), static_cast<long long>(p.total), stats);
        std::fflush(stdout);
      }
      return;
    }
    const int width = 24;
    const double frac = p.total > 0 ? std::min(1.0, double(p.step) / double(p.total)) : 0.0;
    const int filled = int(frac * width);
    std::string line = "[" + std::string(std::size_t(filled), '#') + std::string(std::size_t(width - filled), '.') + "] ";
    char head[64];
    std::snprintf(head, sizeof head, "%lld/%lld  ", static_cast<long long>(p.step), static_cast<long long>(p.total));
    line += head;
    line += stats;
    line.resize(std::min(line.size(), std::size_t(columns() - 1)));  // never wrap: \r must reach the start
    std::printf("\r\033[K%s", line.c_str());
    std::fflush(stdout);
    drawn_ = true;
  }

  // A line of its own (an evaluation, a checkpoint); the bar is redrawn by the next update.
  void message(const std::string& s) {
    clear();
    std::printf("%s\n", s.c_str());
    std::fflush(stdout);
  }

  // Leaves the last bar on screen and moves below it.
  void finish() {
    if (drawn_) std::printf("\n");
    drawn_ = false;
    std::fflush(stdout);
  }

 private:
  void clear() {
    if (drawn_) std::printf("\r\033[K");
    drawn_ = false;
  }
  static int columns() {
    winsize w{};
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &w) == 0 && w.ws_col >= 40) return w.ws_col;
    return 100;
  }

  bool tty_;
  std::int64_t every_;
  bool drawn_ = false;
};

}  // namespace train
