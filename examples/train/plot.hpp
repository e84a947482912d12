// The loss and accuracy curves of a run: a PNG drawn by gnuplot when it is on PATH, else an
// SVG line chart written here (no dependency). Either way the file appears atomically
// (written under a temporary name, then renamed).
// Part of the trainer; include examples/train/trainer.hpp instead.
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include <ssmx/io/safetensors.hpp>  // write_file_atomically

#include "metrics.hpp"

namespace train {

namespace plot_detail {

// Averages of consecutive points, at most `limit` of them: a long run's curve stays light.
inline std::vector<Point> thin(const std::vector<Point>& pts, std::size_t limit) {
  if (pts.size() <= limit) return pts;
  const std::size_t group = (pts.size() + limit - 1) / limit;
  std::vector<Point> out;
  for (std::size_t i = 0; i < pts.size(); i += group) {
    const std::size_t end = std::min(pts.size(), i + group);
    Point p{pts[end - 1].step, 0, 0};
    for (std::size_t k = i; k < end; ++k) {
      p.loss += pts[k].loss;
      p.accuracy += pts[k].accuracy;
    }
    p.loss /= double(end - i);
    p.accuracy /= double(end - i);
    out.push_back(p);
  }
  return out;
}

// Round tick positions covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
inline std::vector<double> ticks(double lo, double hi) {
  const double raw = (hi - lo) / 5.0;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double step = raw / mag < 1.5 ? mag : raw / mag < 3.5 ? 2 * mag : raw / mag < 7.5 ? 5 * mag : 10 * mag;
  std::vector<double> t;
  for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step) t.push_back(std::abs(v) < 1e-12 * step ? 0 : v);
  return t;
}

inline std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

inline std::string escape(const std::string& s) {
  std::string o;
  for (char c : s) o += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : std::string(1, c);
  return o;
}

struct Series {
  std::vector<Point> pts;
  bool accuracy;  // which value of the points
  const char* color;
  const char* label;
  bool markers;
};

// One panel of the SVG: axes, grid, ticks and the series; the y range is that of the data
// (accuracy: [0, 1]).
inline void panel(std::ostringstream& svg, double top, const char* title, const std::vector<Series>& series,
                  double x_max, bool accuracy, double chance) {
  const double left = 70, width = 800, height = 230;
  double lo = 0, hi = 1;
  if (!accuracy) {
    lo = INFINITY, hi = -INFINITY;
    for (const auto& s : series)
      for (const auto& p : s.pts)
        if (std::isfinite(p.loss)) lo = std::min(lo, p.loss), hi = std::max(hi, p.loss);
    if (!(lo <= hi)) lo = 0, hi = 1;
    const double pad = std::max(1e-6, 0.05 * (hi - lo));
    lo -= pad, hi += pad;
  }
  auto X = [&](double x) { return left + width * x / x_max; };
  auto Y = [&](double y) { return top + height * (1 - (y - lo) / (hi - lo)); };
  svg << "<text x='" << left << "' y='" << top - 8 << "' font-weight='bold'>" << title << "</text>\n";
  svg << "<rect x='" << left << "' y='" << top << "' width='" << width << "' height='" << height
      << "' fill='none' stroke='#444'/>\n";
  for (double y : ticks(lo, hi)) {
    svg << "<line x1='" << left << "' x2='" << left + width << "' y1='" << Y(y) << "' y2='" << Y(y)
        << "' stroke='#ddd'/>\n";
    svg << "<text x='" << left - 6 << "' y='" << Y(y) + 4 << "' text-anchor='end'>" << num(y) << "</text>\n";
  }
  for (double x : ticks(0, x_max)) {
    svg << "<line x1='" << X(x) << "' x2='" << X(x) << "' y1='" << top << "' y2='" << top + height
        << "' stroke='#eee'/>\n";
    svg << "<text x='" << X(x) << "' y='" << top + height + 16 << "' text-anchor='middle'>" << num(x) << "</text>\n";
  }
  if (accuracy && chance >= 0)
    svg << "<line x1='" << left << "' x2='" << left + width << "' y1='" << Y(chance) << "' y2='" << Y(chance)
        << "' stroke='#888' stroke-dasharray='6,4'/>\n";
  double legend_x = left + 10;
  for (const auto& s : series) {
    if (s.pts.empty()) continue;
    svg << "<polyline fill='none' stroke='" << s.color << "' stroke-width='1.5' points='";
    for (const auto& p : s.pts) {
      const double v = s.accuracy ? p.accuracy : p.loss;
      if (std::isfinite(v)) svg << X(double(p.step)) << "," << Y(v) << " ";
    }
    svg << "'/>\n";
    if (s.markers)
      for (const auto& p : s.pts) {
        const double v = s.accuracy ? p.accuracy : p.loss;
        if (std::isfinite(v))
          svg << "<circle cx='" << X(double(p.step)) << "' cy='" << Y(v) << "' r='3' fill='" << s.color << "'/>\n";
      }
    svg << "<text x='" << legend_x << "' y='" << top + 16 << "' fill='" << s.color << "'>" << s.label << "</text>\n";
    legend_x += 110;
  }
  if (accuracy && chance >= 0)
    svg << "<text x='" << legend_x << "' y='" << top + 16 << "' fill='#888'>chance " << num(chance) << "</text>\n";
}

inline std::string svg(const History& h, const std::string& title) {
  const auto train = thin(h.train, 1500);
  double x_max = 1;
  for (const auto* v : {&h.train, &h.eval})
    for (const auto& p : *v) x_max = std::max(x_max, double(p.step));
  std::ostringstream s;
  s << "<?xml version='1.0' encoding='UTF-8'?>\n"
    << "<svg xmlns='http://www.w3.org/2000/svg' width='900' height='640' font-family='sans-serif' font-size='12'>\n"
    << "<rect width='100%' height='100%' fill='white'/>\n"
    << "<text x='450' y='22' text-anchor='middle' font-size='15'>" << escape(title) << "</text>\n";
  panel(s, 60, "loss (nats/token)",
        {{train, false, "#1f77b4", "train", false}, {h.eval, false, "#ff7f0e", "eval", true}}, x_max, false, -1);
  panel(s, 360, "accuracy",
        {{train, true, "#1f77b4", "train", false}, {h.eval, true, "#ff7f0e", "eval", true}}, x_max, true, h.chance);
  s << "<text x='470' y='630' text-anchor='middle'>step</text>\n</svg>\n";
  return s.str();
}

// The full path of `name` on PATH, if it is there and executable.
inline std::string find_on_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string f = (dir.empty() ? "." : dir) + "/" + name;
    struct stat st {};
    if (::stat(f.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(f.c_str(), X_OK) == 0) return f;
  }
  return "";
}

inline std::string shell_quote(const std::string& s) {
  std::string o = "'";
  for (char c : s) o += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return o + "'";
}

// gnuplot renders into a temporary file that is renamed on success; false if it fails.
inline bool gnuplot_png(const std::string& gnuplot, const History& h, const std::string& title,
                        const std::string& png) {
  namespace fs = std::filesystem;
  const std::string tmp = png + ".tmp." + std::to_string(::getpid());
  const std::string train_dat = tmp + ".train", eval_dat = tmp + ".eval", script = tmp + ".gp";
  auto write_points = [](const std::string& f, const std::vector<Point>& pts) {
    std::ostringstream o;
    o.precision(10);
    for (const auto& p : pts) o << p.step << " " << p.loss << " " << p.accuracy << "\n";
    ssmx::io::write_file_atomically(f, o.str());
  };
  bool ok = false;
  try {
    write_points(train_dat, thin(h.train, 5000));
    write_points(eval_dat, h.eval);
    auto q = [](const std::string& s) {  // a gnuplot string literal
      std::string o = "'";
      for (char c : s) o += c == '\'' ? std::string("''") : std::string(1, c);
      return o + "'";
    };
    auto plot = [&](int col, const char* what) {
      std::string cmd = "plot " + q(train_dat) + " using 1:" + std::to_string(col) + " with lines lw 1.5 title 'train'";
      if (!h.eval.empty())
        cmd += ", " + q(eval_dat) + " using 1:" + std::to_string(col) + " with linespoints pt 7 title 'eval'";
      if (col == 3 && h.chance >= 0) cmd += ", " + num(h.chance) + " with lines dt 2 lc 'gray' title 'chance'";
      return std::string("set title '") + what + "'\n" + cmd + "\n";
    };
    std::string gp;
    for (const char* term : {"pngcairo", "png"}) {  // pngcairo looks better; png (libgd) is more common
      gp = std::string("set terminal ") + term + " size 900,640\nset output " + q(tmp) +
           "\nset multiplot layout 2,1 title " + q(title) + "\nset grid\nset xlabel 'step'\nset key top right\n" +
           plot(2, "loss (nats/token)") + "set yrange [0:1]\n" + plot(3, "accuracy") + "unset multiplot\n";
      ssmx::io::write_file_atomically(script, gp);
      const std::string cmd = shell_quote(gnuplot) + " " + shell_quote(script) + " >/dev/null 2>&1";
      std::error_code size_ec;
      const bool drawn = std::system(cmd.c_str()) == 0 && fs::file_size(tmp, size_ec) > 0 && !size_ec;
      if (drawn) {
        fs::rename(tmp, png);
        ok = true;
        break;
      }
    }
  } catch (const std::exception&) {
    ok = false;
  }
  std::error_code ec;
  for (const auto& f : {tmp, train_dat, eval_dat, script}) fs::remove(f, ec);
  return ok;
}

}  // namespace plot_detail

// Writes <dir>/plot.png (gnuplot) or <dir>/plot.svg; returns the path, or "" when the
// history is empty.
inline std::string write_plot(const History& h, const std::string& dir, const std::string& title) {
  if (h.train.empty() && h.eval.empty()) return "";
  const std::string gnuplot = plot_detail::find_on_path("gnuplot");
  const std::string png = dir + "/plot.png", svg = dir + "/plot.svg";
  std::error_code ec;
  if (!gnuplot.empty() && plot_detail::gnuplot_png(gnuplot, h, title, png)) {
    std::filesystem::remove(svg, ec);  // this run's older plot in the other format (a resume)
    return png;
  }
  ssmx::io::write_file_atomically(svg, plot_detail::svg(h, title));
  std::filesystem::remove(png, ec);
  return svg;
}

}  // namespace train
