// A job in which rank 1 never reaches a collective: it dies (`killed`, std::_Exit(3)) or
// hangs (`stuck`). Every other rank must leave the all-reduce after the timeout with a
// DistTimeoutError and abort the job, so the job ends instead of hanging.
//   usage: ssmx_dist_failure killed|stuck <timeout seconds>
#include <ssmx/dist/communicator.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

int main(int argc, char** argv) {
  ssmx::dist::Environment env(&argc, &argv);
  const std::string mode = argc > 1 ? argv[1] : "killed";
  const double timeout = argc > 2 ? std::atof(argv[2]) : 5.0;
  try {
    ssmx::dist::Communicator comm;
    comm.set_timeout(timeout);
    comm.barrier();  // everyone is up
    if (comm.rank() == 1) {
      if (mode == "killed") std::_Exit(3);
      std::this_thread::sleep_for(std::chrono::seconds(600));  // stuck: MPI_Abort ends it
    }
    double x[4] = {1, 2, 3, 4};
    comm.allreduce_sum(x, 4);
    std::fprintf(stderr, "rank %d: the all-reduce completed without rank 1\n", comm.rank());
    return 0;
  } catch (const ssmx::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    ssmx::dist::Environment::abort(2);
  }
}
