/* QMP commands of the job framework: query-jobs and the job-* verbs
 * (QEMU 7.2 job-qmp.c's behaviour: "Job not found", then the verb). */
#include "job/job.h"
#include "qmp/qmp.h"
#include "util/opts.h"

static struct job *find_job(json_t *args, error **errp)
{
    struct job *job = job_get(opt_str(args, "id", ""));
    if (!job)
        error_setg(errp, "Job not found");
    return job;
}

#define JOB_VERB_COMMAND(cmd, fn, call)                     \
    static json_t *fn(json_t *args, error **errp)           \
    {                                                       \
        struct job *job = find_job(args, errp);             \
        if (job)                                            \
            call;                                           \
        return NULL;                                        \
    }                                                       \
    QMP_COMMAND(cmd, fn)

JOB_VERB_COMMAND("job-pause", qmp_job_pause, job_user_pause(job, errp))
JOB_VERB_COMMAND("job-resume", qmp_job_resume, job_user_resume(job, errp))
JOB_VERB_COMMAND("job-cancel", qmp_job_cancel, job_user_cancel(job, true, errp))
JOB_VERB_COMMAND("job-complete", qmp_job_complete, job_complete(job, errp))
JOB_VERB_COMMAND("job-finalize", qmp_job_finalize, job_finalize(job, errp))
JOB_VERB_COMMAND("job-dismiss", qmp_job_dismiss, job_dismiss(job, errp))

static json_t *qmp_query_jobs(json_t *args, error **errp)
{
    json_t *list = json_array();
    for (struct job *job = job_next(NULL); job; job = job_next(job))
        if (job->id)
            json_array_append_new(list, job_info(job));
    return list;
}
QMP_COMMAND("query-jobs", qmp_query_jobs)
